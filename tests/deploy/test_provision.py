"""What `fab provision` renders and refuses, without a server: each file checked by what reads it."""

import dataclasses
import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qsl, urlsplit

import pytest
from supervisor.options import ClientOptions, ServerOptions

from deploy.balancer import upstream_lines, upstream_servers
from deploy.commands import ca as ca_commands
from deploy.config import DeployConfig, has_app, load_config
from deploy.env_sources import parse_changes
from deploy.errors import DeployError
from deploy.layout import WEB_PORTS
from deploy.on_server.common import read_env_file
from deploy.progress import PrefixedLines, Progress
from deploy.provision import summary
from deploy.provision.db_host import redis_password, scram_matches
from deploy.provision.env_file import (
    SERVICE_ENV_KEYS,
    SHARED_ENV_KEYS,
    env_change_hosts,
    service_key_problems,
    service_keys_refusal,
    shared_env_values,
)
from deploy.provision.facts import FACTS_SCRIPT, check_facts, parse_facts
from deploy.provision.host import directories, packages_for, services_for
from deploy.render.cluster_tls import (
    ca_certificate,
    ca_dir,
    ca_host,
    cluster_env_values,
    is_ca_host,
    render_server_extensions,
    tls_dir,
    uses_cluster_tls,
)
from deploy.render.db_host import (
    REDIS_KEY_PREFIX,
    REDIS_MOVE_UNDER_PREFIX,
    RedisTLS,
    has_unprefixed_keys,
    pg_hba_with_peers,
    redis_acl_rules,
    redis_bind,
    redis_conf_with_password,
    redis_login_before,
    redis_move_input,
    render_firewall,
    render_firewall_unit,
    render_postgres_listen,
)
from deploy.render.env_file import env_defaults, merge_env_file, sync_env_file
from deploy.render.nginx import (
    ACME_WEBROOT,
    CERT_DIR,
    NginxFacts,
    parse_nginx_facts,
    render_balancer_site,
    render_nginx_site,
)
from deploy.render.supervisord import SUPERVISORCTL_DEFAULT, render_supervisorctl_default, render_supervisord_main
from deploy.render.systemd import (
    UNIT,
    acme_ca_path,
    render_after_network_dropin,
    render_backup_units,
    render_certbot_dropin,
    render_egress_firewall,
    render_egress_unit,
    render_unit,
    render_watchdog_units,
)
from deploy.tls import certbot_command, certificate_fits, certificate_line, parse_certificate
from tests.support.nginx import nginx_test

REPO = Path(__file__).resolve().parents[2]
CONFIG = DeployConfig()
HOST = "203.0.113.7"
GOOD_FACTS = {"systemd": "yes", "init": "systemd", "apt": "yes", "os": "Debian GNU/Linux 12", "python": "3.11"}


def defaults(config: DeployConfig = CONFIG) -> dict[str, str]:
    return env_defaults(config, HOST, secret_key="s" * 67, db_password="pw-_1", redis_password="rp-_2")


def production_settings(env: dict[str, str]) -> dict:
    """The production settings Django builds from `env` (in a subprocess: settings load once per process)."""
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        "print(json.dumps({'hosts': s.ALLOWED_HOSTS, 'db': s.DATABASES['default'], 'broker': s.CELERY_BROKER_URL, "
        "'ssl_redirect': s.SECURE_SSL_REDIRECT, 'secure_cookies': s.SESSION_COOKIE_SECURE, "
        "'static_root': str(s.STATIC_ROOT), 'debug': s.DEBUG, 'cache': s.CACHES['default'], "
        "'backend': s.CELERY_RESULT_BACKEND, 'broker_options': s.CELERY_BROKER_TRANSPORT_OPTIONS, "
        "'backend_options': s.CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS}, default=str))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "project"), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_env_file_is_what_production_settings_need_without_tls():
    values = read_env_file(merge_env_file(None, defaults()))
    settings = production_settings(values)
    assert settings["hosts"] == [HOST, "127.0.0.1", "localhost"]
    assert settings["db"]["ENGINE"] == "django.db.backends.postgresql"
    assert (settings["db"]["HOST"], settings["db"]["NAME"], settings["db"]["PASSWORD"]) == (
        "127.0.0.1",
        "prayer_room",
        "pw-_1",
    )
    assert settings["db"]["USER"] == CONFIG.user.replace("-", "_")
    assert settings["broker"] == settings["backend"] == "redis://prayer-room:rp-_2@127.0.0.1:6379/0"
    assert settings["cache"]["LOCATION"] == "redis://prayer-room:rp-_2@127.0.0.1:6379/1"
    # Every key and channel under the prefix the app's Redis ACL user is limited to (redis.conf.j2).
    assert settings["broker_options"]["global_keyprefix"] == REDIS_KEY_PREFIX
    assert settings["backend_options"]["global_keyprefix"] == REDIS_KEY_PREFIX
    assert settings["cache"]["KEY_PREFIX"] == f"{REDIS_KEY_PREFIX}cache"
    assert redis_password(values) == "rp-_2"
    assert settings["static_root"] == str(REPO / "var" / "static")  # deploy sets STATIC_ROOT=release over it
    assert not settings["ssl_redirect"] and not settings["secure_cookies"] and not settings["debug"]


def test_env_file_names_the_domain_first():
    values = defaults(DeployConfig(domain="prayer.example.org"))
    assert values["ALLOWED_HOSTS"] == f"prayer.example.org,{HOST},127.0.0.1,localhost"


def test_secrets_come_from_the_caller_each_time():
    first = env_defaults(CONFIG, HOST, secret_key="a", db_password="b", redis_password="c")
    assert first["SECRET_KEY"] == "a" and ":b@" in first["DATABASE_URL"] and ":c@" in first["CACHE_URL"]


def test_existing_env_file_is_kept_and_only_missing_keys_are_added():
    existing = "# mine\nSECRET_KEY='keep-me'\nALLOWED_HOSTS=prayer.example.org\nEMAIL_URL=smtp://x:y@mail:587\n"
    merged = merge_env_file(existing, defaults())
    assert merged.startswith(existing)
    values = read_env_file(merged)
    assert values["SECRET_KEY"] == "keep-me" and values["ALLOWED_HOSTS"] == "prayer.example.org"
    assert set(defaults()) <= set(values)
    again = env_defaults(CONFIG, HOST, secret_key="other", db_password="other", redis_password="other")
    assert merge_env_file(merged, again) == merged


def test_a_broker_url_without_the_redis_password_gets_one_and_other_redis_servers_are_left_alone():
    merged = merge_env_file("SECRET_KEY=x\nCELERY_BROKER_URL=redis://127.0.0.1:6379/0\n", defaults())
    values = read_env_file(merged)
    assert values["CELERY_BROKER_URL"] == "redis://prayer-room:rp-_2@127.0.0.1:6379/0"
    assert merged.startswith("SECRET_KEY=x\n")
    assert merged.count("CELERY_BROKER_URL=") == 1
    assert redis_password({"CELERY_BROKER_URL": "redis://:pw@redis.internal:6379/0"}) is None
    assert redis_password({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}) is None


# The app's ACL user's line, the same on a site of one host and on a cluster.
ACL_USER = (
    "user prayer-room reset on >rp-_2 resetkeys ~prayer-room:* resetchannels &prayer-room:* nocommands +@all -@admin"
    " -@dangerous -@scripting +eval +evalsha +script|load +script|exists"
)


def test_redis_conf_admits_the_apps_acl_user_only_last_and_a_new_password_replaces_it():
    debian = "bind 127.0.0.1 -::1\n# requirepass foobared\nport 6379\n"
    first = redis_conf_with_password(debian, "rp-_2", "prayer-room")
    assert first.startswith(debian)
    last = [line for line in first.splitlines() if line and not line.startswith("#")][-3:]
    assert last == ["user default off", ACL_USER, 'rename-command CONFIG ""']
    assert "\nrequirepass" not in first  # the default user is off: no password of its own
    assert redis_conf_with_password(first, "rp-_2", "prayer-room") == first
    second = redis_conf_with_password(first, "other", "prayer-room")
    assert "rp-_2" not in second and second.count("\nuser prayer-room reset on >other resetkeys ") == 1


def test_the_acl_rules_are_redis_commands_words():
    assert " ".join(redis_acl_rules("rp-_2")) == ACL_USER.removeprefix("user prayer-room ")


def test_an_older_block_has_its_broker_keys_moved_once_logged_in_as_it_was():
    marks = ("# --- fab provision (prayer-room): begin", "# --- fab provision (prayer-room): end")
    old_single = f"port 6379\n\n{marks[0]}\nrequirepass rp-_2\n{marks[1]}\n"
    old_cluster = old_single.replace(
        "requirepass rp-_2", "user default off\nuser app on resetpass >rp-_2 resetkeys ~* &*"
    )
    assert has_unprefixed_keys(old_single) and has_unprefixed_keys(old_cluster)
    assert not has_unprefixed_keys("port 6379\n")  # Debian's own: a fresh Redis has nothing to move
    assert not has_unprefixed_keys(redis_conf_with_password(old_single, "rp-_2", "prayer-room"))  # moved: never again
    assert (redis_login_before(old_single), redis_login_before(old_cluster)) == (None, "app")
    move = redis_move_input("rp-_2", "app", 0).splitlines()
    assert move[:2] == ["AUTH app rp-_2", "SELECT 0"] and move[2].endswith('" 0 prayer-room:')
    assert redis_move_input("rp-_2", None, 0).startswith("AUTH rp-_2\n")
    assert (
        '"' not in REDIS_MOVE_UNDER_PREFIX
        and "\\" not in REDIS_MOVE_UNDER_PREFIX
        and "--" not in REDIS_MOVE_UNDER_PREFIX
    )


def test_a_single_servers_redis_urls_from_before_log_in_as_the_apps_acl_user():
    before = {"CELERY_BROKER_URL": "redis://:rp-_2@127.0.0.1:6379/0", "CACHE_URL": "redis://:rp-_2@127.0.0.1:6379/1"}
    values = cluster_env_values(CONFIG, before)
    assert values == {key: url.replace("//:", "//prayer-room:") for key, url in before.items()}
    assert cluster_env_values(CONFIG, values) == values and redis_password(values) == "rp-_2"
    other = {"CELERY_BROKER_URL": "redis://:pw@redis.internal:6379/0", "CACHE_URL": "redis://127.0.0.1:6379/1"}
    assert cluster_env_values(CONFIG, other) == other  # another Redis, or one without a password: left alone


def test_existing_env_file_without_final_newline_gets_one():
    merged = merge_env_file("SECRET_KEY=x", {"SECRET_KEY": "y", "NEW": "1"})
    assert merged == "SECRET_KEY=x\nNEW=1\n"


def test_production_settings_collect_each_release_beside_its_code_with_hashed_names():
    values = {**read_env_file(merge_env_file(None, defaults())), **dict(CONFIG.environment_overrides())}
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "from django.core.files.storage import storages; st = storages['staticfiles']; "
        "print(s.STATIC_ROOT, type(st).__name__)"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "project"), **values}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(REPO / "static"), "ManifestStaticFilesStorage"]


def test_nginx_site_balances_the_configured_web_ports_and_serves_each_release_static():
    site = render_nginx_site(CONFIG, HOST)
    for port in WEB_PORTS:
        assert f"server 127.0.0.1:{port} max_fails=0;" in site
    other = render_nginx_site(DeployConfig(web_ports=(9001, 9002, 9003)), HOST)
    assert [line.strip() for line in other.splitlines() if line.strip().startswith("server 127.")] == [
        f"server 127.0.0.1:{port} max_fails=0;" for port in (9001, 9002, 9003)
    ]
    assert "proxy_next_upstream error timeout non_idempotent;" in site
    assert f"root {CONFIG.layout.current};" in site and f"root {CONFIG.layout.previous};" in site
    assert f"server_name {HOST};" in site
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in site


def test_nginx_site_hides_its_version_refuses_unknown_hosts_and_drops_slow_clients():
    site = render_nginx_site(CONFIG, HOST)
    assert "server_tokens off;" in site
    default = site.split("server {")[1]
    assert "listen 80 default_server;" in default and "return 444;" in default
    timeout = int(site.split("client_body_timeout ")[1].split("s;")[0])
    assert timeout < 60
    assert "acme-challenge" not in site and "listen 443" not in site  # no domain: plain HTTP only


def test_nginx_facts_read_the_version_and_new_nginx_gets_http2_on_instead_of_listens_http2(tmp_path):
    debian_12, debian_13 = parse_nginx_facts("nginx version: nginx/1.22.1\n"), parse_nginx_facts("nginx/1.26.3\n")
    assert (debian_12, debian_13) == (NginxFacts((1, 22, 1)), NginxFacts((1, 26, 3)))
    balancer = replace(cluster(tmp_path), domain="p.example.org")
    for render in (
        lambda nginx: render_nginx_site(DeployConfig(domain="p.example.org"), HOST, nginx=nginx, tls=True),
        lambda nginx: render_balancer_site(balancer, nginx=nginx, tls=True),
    ):
        old, new = render(debian_12), render(debian_13)
        assert old == render(NginxFacts())  # an unknown version gets what every nginx accepts
        assert "listen 443 ssl http2;" in old and "http2 on;" not in old
        assert "listen 443 ssl;" in new and new.count("http2 on;") == 2 and " http2;" not in new


def test_every_server_block_hides_the_version_itself_not_the_http_block_nginx_conf_may_already_set_it(tmp_path):
    sites = [render_nginx_site(DeployConfig(domain="p.example.org"), HOST, tls=tls) for tls in (False, True)]
    sites.append(render_balancer_site(replace(cluster(tmp_path), domain="p.example.org"), tls=True))
    for site in sites:
        blocks = site.split("\nserver {")
        assert "\nserver_tokens" not in blocks[0]  # the http block: Debian 13's nginx.conf sets it there
        assert all("\n    server_tokens off;\n" in block for block in blocks[1:]), site


def test_nginx_site_static_locations_repeat_the_security_headers():
    for site in (
        render_nginx_site(CONFIG, HOST),
        render_nginx_site(DeployConfig(domain="p.example.org"), HOST, tls=True),
    ):
        for block in site.split("location ")[1:]:
            if "/static" in block.split("{")[0]:
                for header in ("X-Content-Type-Options nosniff", "X-Frame-Options DENY", "Cache-Control"):
                    assert f"add_header {header}" in block, block
                assert ("Strict-Transport-Security" in block) == ("listen 443" in site), block


@pytest.mark.deploy  # needs the deploy layer's nginx, which pip cannot install
@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed (.ci/setup.d/20-deploy.sh installs it)")
def test_the_app_users_reach_no_link_local_address(tmp_path):
    rules = render_egress_firewall(CONFIG)
    chain = [line.strip() for line in rules.split("chain output {")[1].split("}\n")[0].splitlines() if line.strip()]
    assert chain == [
        "type filter hook output priority filter; policy accept;",
        'meta skuid { "prayer-room", "prayer-room-build" } ip daddr { 169.254.0.0/16, 100.100.100.200/32 }'
        " reject with icmpx admin-prohibited",
        'meta skuid { "prayer-room", "prayer-room-build" } ip6 daddr { fe80::/10, fd00:ec2::254/128 }'
        " reject with icmpx admin-prohibited",
    ]
    assert "flush ruleset" not in rules and "delete table inet prayer_room_egress\n" in rules
    unit = render_egress_unit(CONFIG)
    assert "ExecStart=/usr/sbin/nft -f /etc/prayer-room/egress.nft\n" in unit and "ExecStop" not in unit
    assert "Before=network-pre.target shutdown.target prayer-room.service\n" in unit
    app = render_unit(CONFIG)
    # Every unit that runs the kit's or the app's code denies the same: link-local, AWS's and Alibaba's addresses.
    deny = "IPAddressDeny=169.254.0.0/16 fe80::/10 fd00:ec2::254/128 100.100.100.200/32\n"
    assert deny in app and "prayer-room-egress.service" in app
    assert deny in render_watchdog_units(CONFIG)[0] and deny in render_backup_units(CONFIG)[0]
    if (
        shutil.which("nft")
        and os.geteuid() == 0
        and subprocess.run(["id", "nobody"], capture_output=True).returncode == 0
    ):
        path = tmp_path / "egress.nft"  # user names must exist where nft reads them: nobody stands in
        path.write_text(render_egress_firewall(DeployConfig(user="nobody")).replace('"nobody-build"', '"nobody"'))
        checked = subprocess.run(["nft", "--check", "-f", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def test_nginx_rate_limits_login_posts_and_public_writes_per_client_address():
    site = render_nginx_site(CONFIG, HOST)
    assert "limit_req_zone $prayer_room_login_key zone=prayer_room_login:1m rate=10r/m;" in site
    assert "limit_req_zone $prayer_room_write_key zone=prayer_room_write:10m rate=60r/m;" in site
    assert '"POST /admin/login/" $binary_remote_addr;' in site
    assert '"~^POST /api/requests/(?:[0-9]+/(?:prayed|flag)/)?$" $binary_remote_addr;' in site
    app = site.split("location / {")[1].split("}")[0]
    assert "limit_req zone=prayer_room_login burst=10 nodelay;" in app and "limit_req_status 429;" in app
    assert "limit_req zone=prayer_room_write burst=20 nodelay;" in app
    off = render_nginx_site(DeployConfig(write_rate_per_minute=0, login_rate_per_minute=0), HOST)
    assert "limit_req zone" not in off and "limit_req_zone" not in off


def test_nginx_accepts_the_site(tmp_path):
    aliases = ("www.prayer.example.org",)
    site = render_nginx_site(DeployConfig(domain="prayer.example.org", aliases=aliases), HOST, ipv6=False)
    result = nginx_test(tmp_path, site)
    assert result.returncode == 0, result.stderr


def test_nginx_site_answers_503_with_retry_after_while_the_maintenance_flag_exists():
    site = render_nginx_site(CONFIG, HOST)
    assert f"if (-f {CONFIG.layout.maintenance_flag}) {{\n        set $prayer_room_maintenance on;" in site
    assert "if ($prayer_room_maintenance) {\n        return 503;" in site
    assert "add_header Retry-After 30 always;" in site and "<h1>Back in a moment</h1>" in site
    assert 'return 503 "<!doctype html> <html lang=\\"en\\">' in site  # quotes escaped for nginx


def test_the_backup_timer_runs_the_root_copy_of_the_helper_daily_and_keeps_backup_keep():
    service, timer = render_backup_units(dataclasses.replace(CONFIG, backup_keep=3))
    assert "Type=oneshot" in service and "After=postgresql.service" in service
    expected = (
        f"ExecStart=python3 {CONFIG.layout.etc}/root_helper.py --env-file {CONFIG.layout.env_file} backup --dir "
        f"{CONFIG.layout.backups} --kind daily --release-link {CONFIG.layout.current} --keep 3\n"
    )
    assert expected in service
    assert "OnCalendar=daily" in timer and "Persistent=true" in timer and "WantedBy=timers.target" in timer


def test_unit_runs_supervisord_in_the_foreground_with_an_absolute_config_and_waits_for_the_worker():
    unit = render_unit(CONFIG)
    assert f"ExecStart=/usr/bin/supervisord --nodaemon --configuration {CONFIG.layout.supervisor_conf}\n" in unit
    assert str(CONFIG.layout.supervisor_conf).startswith("/")
    assert "KillMode=mixed" in unit and "WantedBy=multi-user.target" in unit
    stop_timeout = int(unit.split("TimeoutStopSec=")[1].split()[0])
    assert stop_timeout > CONFIG.task_time_limit + 30  # the worker's stopwaitsecs in supervisord.conf.j2
    assert "After=network-online.target postgresql.service redis-server.service" in unit
    assert UNIT == "prayer-room.service"


def test_unit_sandbox_scores_at_most_5_and_leaves_supervisord_only_what_it_needs(tmp_path):
    unit = render_unit(CONFIG)
    assert "CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_KILL\n" in unit
    assert "ProtectSystem=strict\n" in unit and f"ReadWritePaths={CONFIG.layout.logs}\n" in unit
    assert "RuntimeDirectory=prayer-room\nRuntimeDirectoryMode=0700\n" in unit
    assert CONFIG.layout.supervisor_socket.parent == PurePosixPath("/run/prayer-room")
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (the systemd package; .ci/setup.d/25-provision.sh)")
    path = tmp_path / UNIT
    path.write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=50", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    exposure = float(result.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])
    assert exposure <= 5.0


def test_unit_outside_run_makes_the_socket_directory_writable_instead():
    unit = render_unit(DeployConfig(run="/var/lib/prayer-room/run"))
    assert "RuntimeDirectory" not in unit and "ReadWritePaths=/var/lib/prayer-room/run\n" in unit


def test_plain_supervisorctl_finds_the_app_socket(tmp_path):
    text = render_supervisorctl_default(CONFIG)
    (tmp_path / "supervisord.conf").write_text(text)
    options = ClientOptions()
    options.realize(args=["-c", str(tmp_path / "supervisord.conf")])
    assert options.serverurl == f"unix://{CONFIG.layout.supervisor_socket}"
    # Found before Debian's own config (whose supervisor.service provision turns off).
    assert options.searchpaths.index(str(SUPERVISORCTL_DEFAULT)) < options.searchpaths.index(
        "/etc/supervisor/supervisord.conf"
    )


def test_supervisord_main_config_is_private_and_includes_the_deployed_programs(tmp_path):
    text = render_supervisord_main(CONFIG)
    assert "[inet_http_server]" not in text
    assert "chown=" not in text  # root's, in a root-only directory
    assert f"files = {CONFIG.layout.programs_conf}" in text
    # supervisord's own parser (as root, an existing user, and the paths moved under tmp_path).
    config = DeployConfig(user="root", root=str(tmp_path / "srv"), etc=str(tmp_path / "etc"), run=str(tmp_path / "run"))
    for path in [*(path for path, _, _ in directories(config)), config.layout.run]:
        Path(path).mkdir(parents=True, exist_ok=True)
    (tmp_path / "supervisord.conf").write_text(render_supervisord_main(config))
    options = ServerOptions()
    options.realize(args=["-c", str(tmp_path / "supervisord.conf")])
    server = options.server_configs[0]
    assert server["family"] == 1  # AF_UNIX: no TCP listener
    assert server["file"] == str(config.layout.supervisor_socket)
    assert not str(CONFIG.layout.supervisor_socket).startswith("/tmp")
    assert server["chmod"] == 0o700 and server["chown"] == (-1, -1)  # left as made: root's
    assert options.pidfile.startswith(str(config.layout.run))


def test_directories_let_nginx_reach_static_files_but_not_logs():
    wanted = {str(path): (owner, mode) for path, owner, mode in directories(CONFIG)}
    static = CONFIG.layout.static("20260101000000-abcdef012345")
    for path in [static, *static.parents][: len(static.parents) - 1]:
        if str(path) in wanted:
            assert int(wanted[str(path)][1][-1]) & 1, f"{path} must be traversable by nginx"
    assert wanted[str(CONFIG.layout.logs)] == ("root", "750")


def test_the_app_user_owns_no_directory():
    layout = CONFIG.layout
    owners = {str(path): owner for path, owner, _ in directories(DeployConfig(domain="prayer.example.org"))}
    assert set(owners.values()) == {"root"}
    for path in (layout.root, layout.releases, layout.venvs, layout.env_file.parent, layout.logs, layout.etc):
        assert owners[str(path)] == "root", path
    assert all(not int(mode[-2:], 8) & 0o22 for _, _, mode in directories(CONFIG))


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"systemd": "no", "init": "sshd"}, "does not run systemd (PID 1 is sshd)"),
        ({"apt": "no", "os": "Fedora Linux 40"}, "no apt-get on Fedora Linux 40"),
        ({"python": "3.9"}, "python3 3.9; the app needs python3 >= 3.11"),
        ({"python": ""}, "no python3; the app needs python3 >= 3.11"),
    ],
)
def test_server_that_cannot_be_provisioned_is_refused_with_what_to_do(facts, expected):
    with pytest.raises(DeployError) as raised:
        check_facts({**GOOD_FACTS, **facts}, "root@host:22")
    message = str(raised.value)
    assert message.startswith("root@host:22: ") and expected in message and "\n" not in message


def test_supported_server_passes():
    check_facts(GOOD_FACTS, "root@host:22")


def test_facts_script_reports_every_fact_on_this_machine():
    facts = parse_facts(subprocess.run(["sh", "-c", FACTS_SCRIPT], capture_output=True, text=True).stdout)
    assert set(facts) == {"systemd", "init", "apt", "os", "python"}
    assert facts["apt"] == ("yes" if shutil.which("apt-get") else "no")
    assert facts["systemd"] == ("yes" if Path("/run/systemd/system").is_dir() else "no")
    assert facts["init"] == Path("/proc/1/comm").read_text().strip()
    assert facts["python"].startswith("3.")


def test_summary_counts_the_steps_that_changed_the_server():
    out = io.StringIO()
    progress = Progress("provision vps", out=out)
    for name, changed in (("packages", True), ("app user", False), ("nginx", True)):
        with progress.step(name) as outcome:
            outcome.changed, outcome.note = changed, "note" if changed else ""
    assert "   changed  packages (" in out.getvalue() and "   ok  app user (" in out.getvalue()
    assert "2 of 3 steps changed the server (packages, nginx)" in summary("vps", progress)
    quiet = Progress("provision vps", out=io.StringIO())
    with quiet.step("packages") as outcome:
        outcome.changed = False
    assert "nothing changed" in summary("vps", quiet)


TLS = DeployConfig(domain="prayer.example.org", acme_email="admin@example.org", acme_ca_bundle="/local/ca.pem")


def test_certbot_uses_the_webroot_nginx_serves_and_reloads_nginx_on_renewal():
    command = certbot_command(TLS, replace=False)
    assert command.startswith(f"REQUESTS_CA_BUNDLE={acme_ca_path(TLS)} certbot certonly --non-interactive")
    for part in (
        f"--webroot --webroot-path {ACME_WEBROOT}",
        "--domains prayer.example.org",
        f"--server {TLS.acme_directory}",
        "--deploy-hook 'systemctl reload nginx'",
        "--email admin@example.org",
        "--keep-until-expiring",
    ):
        assert part in command
    assert "--force-renewal" in certbot_command(TLS, replace=True)
    assert "REQUESTS_CA_BUNDLE" not in certbot_command(replace(TLS, acme_ca_bundle=""), replace=False)
    site = render_nginx_site(TLS, HOST)
    assert f"location /.well-known/acme-challenge/ {{\n        root {ACME_WEBROOT};" in site
    assert (ACME_WEBROOT, "root", "755") in directories(TLS)
    dropin = render_certbot_dropin(TLS)
    assert f"Environment=REQUESTS_CA_BUNDLE={acme_ca_path(TLS)}\n" in dropin and "[Service]" in dropin


def test_the_tls_site_redirects_http_except_the_challenge_and_refuses_unknown_names_on_443():
    site = render_nginx_site(TLS, HOST, tls=True)
    http, https = site.split("server {")[2], site.split("server {")[3]
    assert "acme-challenge" in http and "return 301 https://$host$request_uri;" in http and "proxy_pass" not in http
    assert "listen 443 ssl http2;" in https and "proxy_pass http://prayer_room_web;" in https
    assert f"ssl_certificate {CERT_DIR}/fullchain.pem;" in https and "server_name prayer.example.org;" in https
    default = site.split("server {")[1]
    assert "listen 443 ssl http2 default_server;" in default and "ssl_reject_handshake on;" in default
    assert HOST not in site  # only the domain: the address alone gets 444


def test_each_alias_answers_the_challenge_and_redirects_301_to_the_domain_with_path_and_query(tmp_path):
    config = replace(TLS, aliases=("www.prayer.example.org", "old.example.net"))
    names = "www.prayer.example.org,old.example.net"
    assert f"--domains prayer.example.org,{names}" in certbot_command(config, replace=False)  # one certificate
    for scheme, site in (
        ("http", render_nginx_site(config, HOST)),  # before the certificate: the challenge for every name
        ("https", render_nginx_site(config, HOST, tls=True)),
        (
            "https",
            render_balancer_site(replace(cluster(tmp_path), domain=TLS.domain, aliases=config.aliases), tls=True),
        ),
    ):
        blocks = [
            block for block in site.split("server {") if "server_name www.prayer.example.org old.example.net;" in block
        ]
        assert len(blocks) == (2 if scheme == "https" else 1), site
        assert "acme-challenge" in blocks[0] and "listen 80;" in blocks[0]
        for block in blocks:
            assert f"return 301 {scheme}://prayer.example.org$request_uri;" in block and "proxy_pass" not in block
        if scheme == "https":
            assert "listen 443 ssl" in blocks[1] and f"ssl_certificate {CERT_DIR}/fullchain.pem;" in blocks[1]
        main = [block for block in site.split("server {") if "server_name prayer.example.org" in block]
        assert main and all("www." not in block for block in main)  # the domain's own blocks name only it
    assert "www.prayer" not in render_nginx_site(TLS, HOST, tls=True)  # no aliases: no alias block


CERTIFICATE_OUTPUT = """\
notAfter=Mar  2 12:00:00 2027 GMT
X509v3 Subject Alternative Name: \n    DNS:prayer.example.org
server=https://acme-v02.api.letsencrypt.org/directory
"""


def test_the_certificate_is_read_and_status_warns_when_it_is_close_to_expiry():
    certificate = parse_certificate(CERTIFICATE_OUTPUT)
    assert certificate["names"] == ["prayer.example.org"] and certificate["server"] == TLS.acme_directory
    expires = certificate["expires"]
    assert time.strftime("%Y-%m-%d %H:%M", time.gmtime(expires)) == "2027-03-02 12:00"
    assert parse_certificate("") is None
    assert certificate_fits(TLS, certificate, expires - 10)
    assert not certificate_fits(TLS, certificate, expires + 10)
    assert not certificate_fits(replace(TLS, domain="other.example.org"), certificate, expires - 10)
    assert not certificate_fits(replace(TLS, acme_directory="https://staging/dir"), certificate, expires - 10)
    day = 86400
    assert certificate_line(TLS, certificate, expires - 40 * day).startswith(
        "certificate: prayer.example.org, expires in 40 days (2027-03-02)"
    )
    assert "WARNING" not in certificate_line(TLS, certificate, expires - 14 * day)
    assert "WARNING: under 14 days" in certificate_line(TLS, certificate, expires - 13.5 * day)
    assert "run `fab provision`" in certificate_line(TLS, None, expires)


def test_a_changed_domain_or_alias_list_no_longer_fits_the_live_certificate_and_status_says_so():
    both = parse_certificate(
        CERTIFICATE_OUTPUT.replace("DNS:prayer.example.org", "DNS:prayer.example.org, DNS:www.prayer.example.org")
    )
    expires = both["expires"] - 40 * 86400
    with_www = replace(TLS, aliases=("WWW.prayer.example.org",))
    assert certificate_fits(with_www, both, expires)  # the same names, whatever the case
    assert not certificate_fits(TLS, both, expires)  # an alias removed: re-issued without it
    assert not certificate_fits(replace(with_www, aliases=("old.example.net",)), both, expires)
    assert not certificate_fits(replace(with_www, domain="new.example.org"), both, expires)
    assert "WARNING" not in certificate_line(with_www, both, expires)
    line = certificate_line(replace(with_www, aliases=()), both, expires)
    assert "WARNING: deploy.toml wants prayer.example.org: `fab provision` re-issues it" in line


# --- a cluster: each host provisioned for its roles --------------------------------------------

CLUSTER_TOML = """
[environments.cluster.roles]
web = ["root@10.0.0.2", "root@10.0.0.3"]
worker = ["root@10.0.0.4"]
beat = ["root@10.0.0.4", "root@10.0.0.2"]
db = ["root@10.0.0.4"]
balancer = ["root@10.0.0.5"]
"""


def cluster(tmp_path, text: str = CLUSTER_TOML, environment: str = "cluster") -> DeployConfig:
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return load_config(path, environment)


def cluster_defaults(config: DeployConfig, host: str) -> dict[str, str]:
    return env_defaults(config.at(host), host, secret_key="s" * 67, db_password="pw-_1", redis_password="rp-_2")


def test_each_cluster_host_gets_only_its_roles_packages_and_services(tmp_path):
    config = cluster(tmp_path)
    db, web, balancer = config.at("10.0.0.4"), config.at("10.0.0.2"), config.at("10.0.0.5")
    # The db host runs the app too: its PostgreSQL brings the client; the firewall needs nftables.
    assert packages_for(db) == ("python3-venv", "postgresql", "redis-server", "supervisor", "nftables", "openssl")
    assert services_for(db) == ("postgresql", "redis-server")  # no nginx: it serves no web
    assert packages_for(web) == ("python3-venv", "nginx", "supervisor", "postgresql-client", "nftables", "openssl")
    assert services_for(web) == ("nginx",)
    assert packages_for(balancer) == ("nginx",) and not has_app(balancer)
    assert has_app(db) and has_app(web) and has_app(CONFIG)
    assert packages_for(CONFIG) == ("python3-venv", "postgresql", "redis-server", "nginx", "supervisor", "nftables")
    assert not has_app(
        cluster(
            tmp_path,
            CLUSTER_TOML.replace('worker = ["root@10.0.0.4"]', 'worker = ["root@10.0.0.3"]').replace(
                'beat = ["root@10.0.0.4", ', "beat = ["
            ),
        ).at("10.0.0.4")
    )


def test_cluster_env_files_reach_the_db_host_and_name_the_balancer(tmp_path):
    config = cluster(tmp_path)
    values = cluster_defaults(config, "10.0.0.3")
    assert values["ALLOWED_HOSTS"] == "10.0.0.5,127.0.0.1,localhost"
    settings = production_settings(read_env_file(merge_env_file(None, values)))
    assert (settings["db"]["HOST"], settings["db"]["PORT"], settings["db"]["PASSWORD"]) == ("10.0.0.4", 5432, "pw-_1")
    assert settings["broker"] == "redis://prayer-room:rp-_2@10.0.0.4:6379/0"
    assert settings["cache"]["LOCATION"] == "redis://prayer-room:rp-_2@10.0.0.4:6379/1"
    assert redis_password(values, "10.0.0.4") == "rp-_2" and redis_password(values) is None
    assert service_key_problems(config, values) == []
    no_balancer = cluster(tmp_path, CLUSTER_TOML.replace('balancer = ["root@10.0.0.5"]', ""))
    assert cluster_defaults(no_balancer, "10.0.0.2")["ALLOWED_HOSTS"] == "10.0.0.2,10.0.0.3,127.0.0.1,localhost"


def test_every_app_host_gets_the_primarys_shared_values_and_keeps_its_other_lines(tmp_path):
    config = cluster(tmp_path)
    primary_file = merge_env_file(None, cluster_defaults(config, "10.0.0.2"))
    shared = shared_env_values(read_env_file(primary_file), cluster_defaults(config, "10.0.0.3") | {"SECRET_KEY": "x"})
    assert set(shared) == set(SHARED_ENV_KEYS) and shared["SECRET_KEY"] == "s" * 67  # the primary's, not the new one
    other = "# mine\nexport SECRET_KEY='old'\nEMAIL_URL=smtp://mail:25\nCACHE_URL=redis://127.0.0.1:6379/1\n"
    synced = sync_env_file(other, shared, cluster_defaults(config, "10.0.0.3"))
    values = read_env_file(synced)
    assert {key: values[key] for key in SHARED_ENV_KEYS} == shared
    assert values["EMAIL_URL"] == "smtp://mail:25" and synced.startswith("# mine\nSECRET_KEY=" + "s" * 67 + "\n")
    assert synced.count("CACHE_URL=") == 1 and sync_env_file(synced, shared, {"SECRET_KEY": "new"}) == synced
    assert read_env_file(sync_env_file(None, {"SECRET_KEY": " padded '"}, {}))["SECRET_KEY"] == " padded '"
    first_run = shared_env_values(None, cluster_defaults(config, "10.0.0.2"))
    assert first_run == {key: cluster_defaults(config, "10.0.0.2")[key] for key in SHARED_ENV_KEYS}


def test_a_cluster_without_a_db_host_needs_its_managed_services_urls(tmp_path):
    config = cluster(tmp_path, CLUSTER_TOML.replace('db = ["root@10.0.0.4"]', ""))
    values = cluster_defaults(config, "10.0.0.2")
    assert not set(SERVICE_ENV_KEYS) & set(values)  # nothing generated: no local PostgreSQL or Redis to point at
    assert service_key_problems(config, values) == list(SERVICE_ENV_KEYS)
    managed = {
        "DATABASE_URL": "postgres://app:pw@db.internal:5432/app",
        "CELERY_BROKER_URL": "rediss://:pw@redis.internal:6380/0",
        "CACHE_URL": "redis://:pw@127.0.0.1:6379/1",
    }
    assert service_key_problems(config, managed) == ["CACHE_URL"]
    assert service_key_problems(cluster(tmp_path), managed) == list(SERVICE_ENV_KEYS)  # with a db host: not it
    refusal = service_keys_refusal(config, "root@10.0.0.2", ["CACHE_URL"])
    assert refusal.startswith("the cluster cluster has no db host: put CACHE_URL for your PostgreSQL and Redis into ")
    assert "root@10.0.0.2's /srv/prayer-room/shared/env (the primary's" in refusal
    assert "10.0.0.4" in service_keys_refusal(cluster(tmp_path), "root@10.0.0.2", ["DATABASE_URL"])


def test_the_refusal_without_a_db_host_names_the_env_command_with_urls_on_tls_checked_against_the_ca(tmp_path):
    config = cluster(tmp_path, CLUSTER_TOML.replace('db = ["root@10.0.0.4"]', ""))
    refusal = service_keys_refusal(config, "root@10.0.0.2", list(SERVICE_ENV_KEYS))
    command, _, after = refusal.partition("fab env ")[2].partition(";")
    assert after == " then run `fab provision` again."
    words = shlex.split(command)
    assert words[:2] == ["--env", "cluster"] and words[2::2] == ["--set"] * 3
    values, unsets = parse_changes(config, words[3::2], [])  # what fab env takes, as the operator pastes it
    assert list(values) == list(SERVICE_ENV_KEYS) and unsets == []
    database, broker, cache = (urlsplit(values[key]) for key in SERVICE_ENV_KEYS)
    assert dict(parse_qsl(database.query)) == {"sslmode": "verify-full", "sslrootcert": "CA_FILE"}
    redis_tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": "true", "ssl_ca_certs": "CA_FILE"}
    assert (broker.scheme, broker.path, dict(parse_qsl(broker.query))) == ("rediss", "/0", redis_tls)
    assert (cache.scheme, cache.path, dict(parse_qsl(cache.query))) == ("rediss", "/1", redis_tls)
    assert "redis://" not in refusal and "CA_FILE: its certificate on each app host" in refusal
    one = service_keys_refusal(config, "root@10.0.0.2", ["CACHE_URL"])  # only the keys still wrong
    assert "--set 'CACHE_URL=rediss://" in one and "DATABASE_URL" not in one


def test_before_provision_has_laid_out_every_app_host_an_env_change_of_the_keys_it_copies_writes_the_others(tmp_path):
    """A cluster without a db host whose provision stopped for the service URLs: only the primary has its layout.
    `fab env --set` of the URLs writes the hosts laid out (provision copies them from the primary to the others);
    a key provision does not copy, or a primary not laid out, is refused naming what to do, before any lock."""
    config = cluster(tmp_path, CLUSTER_TOML.replace('db = ["root@10.0.0.4"]', ""))
    app = [host for host in config.site_hosts if has_app(config.for_host(host))]
    assert app == ["root@10.0.0.2", "root@10.0.0.3", "root@10.0.0.4"] and config.primary == app[0]
    everyone = env_change_hosts(config, app, set(app), ["DATABASE_URL", "LOG_LEVEL"])
    assert everyone == app  # the positive control: all laid out, all written, whatever the key
    urls = env_change_hosts(config, app, {app[0]}, list(SERVICE_ENV_KEYS))
    assert urls == [app[0]]
    assert env_change_hosts(config, app, {app[0], app[2]}, ["SECRET_KEY"]) == [app[0], app[2]]
    own = "root@10.0.0.3, root@10.0.0.4 not provisioned yet (no /srv/prayer-room): before `fab provision` has run"
    with pytest.raises(DeployError, match=re.escape(own)) as refused:
        env_change_hosts(config, app, {app[0]}, ["DATABASE_URL", "LOG_LEVEL"])
    copied = "only SECRET_KEY, ALLOWED_HOSTS, DATABASE_URL, CELERY_BROKER_URL, CACHE_URL (provision copies them"
    assert str(refused.value).endswith(f"{copied} from the primary's env file), not LOG_LEVEL."), refused.value
    with pytest.raises(DeployError, match=r"^the primary root@10.0.0.2 has no /srv/prayer-room yet: run `fab prov"):
        env_change_hosts(config, app, {app[1], app[2]}, ["DATABASE_URL"])


def test_postgresql_listens_on_the_db_address_and_admits_the_app_role_from_each_peer_only(tmp_path):
    config = cluster(tmp_path)
    assert "\nlisten_addresses = 'localhost,10.0.0.4'\n" in render_postgres_listen(config)
    debian = "local   all   postgres   peer\nhost    all   all   127.0.0.1/32   scram-sha-256\n"
    hba = pg_hba_with_peers(debian, config, "prayer_room", "prayer_room")
    assert hba.startswith(debian)
    rules = [line.split() for line in hba.splitlines()[2:] if line and not line.startswith("#")]
    assert rules == [
        ["hostssl", "prayer_room", "prayer_room", f"{address}/32", "scram-sha-256"]
        for address in ("10.0.0.2", "10.0.0.3", "10.0.0.4")  # the app hosts: not the balancer (10.0.0.5)
    ]
    assert pg_hba_with_peers(hba, config, "prayer_room", "prayer_room") == hba


def test_a_clusters_urls_name_the_db_host_over_tls_checked_against_the_cluster_ca(tmp_path):
    config = cluster(tmp_path)
    plain = cluster_defaults(config, "10.0.0.2")  # as an env file from before cluster TLS has them
    values = cluster_env_values(config, plain)
    ca = "/etc/prayer-room/cluster-ca.crt"
    assert values["DATABASE_URL"] == (
        f"postgres://prayer_room:pw-_1@10.0.0.4:5432/prayer_room?sslmode=verify-full&sslrootcert={ca}"
    )
    for key, db in (("CELERY_BROKER_URL", 0), ("CACHE_URL", 1)):
        assert values[key] == (
            f"rediss://prayer-room:rp-_2@10.0.0.4:6379/{db}?ssl_cert_reqs=required&ssl_check_hostname=true"
            f"&ssl_ca_certs={ca}"
        )
    assert cluster_env_values(config, values) == values  # a re-run changes nothing
    assert redis_password(values, "10.0.0.4") == "rp-_2"
    managed = {"DATABASE_URL": "postgres://app:pw@db.internal:5432/app", "CACHE_URL": "redis://:pw@10.0.0.9:6379/1"}
    assert cluster_env_values(config, managed) == managed  # another host's URL is the operator's: left alone
    assert cluster_env_values(CONFIG, plain) == plain  # a site of one host: loopback, no TLS


def test_a_clusters_redis_speaks_tls_only_to_the_apps_acl_user(tmp_path):
    tls = RedisTLS(6379, "/etc/prayer-room/tls/db.crt", "/etc/prayer-room/tls/db-redis.key", "/e/ca.crt")
    conf = redis_conf_with_password("port 6379\n", "rp-_2", "prayer-room", redis_bind(cluster(tmp_path)), tls)
    directives = [line for line in conf.splitlines() if line and not line.startswith("#")]
    for line in ("port 0", "tls-port 6379", "tls-cert-file /etc/prayer-room/tls/db.crt", "user default off"):
        assert line in directives, line
    assert ACL_USER in directives  # the same user as a site of one host's
    assert not any(line.startswith("requirepass") for line in directives)
    assert redis_conf_with_password(conf, "rp-_2", "prayer-room", redis_bind(cluster(tmp_path)), tls) == conf


def test_the_db_hosts_redis_binds_loopback_and_the_db_address_with_its_password(tmp_path):
    debian = "bind 127.0.0.1 -::1\nport 6379\n"
    conf = redis_conf_with_password(debian, "rp-_2", "prayer-room", redis_bind(cluster(tmp_path)))
    directives = [line for line in conf.splitlines() if line and not line.startswith("#")]
    binds = [line for line in directives if line.startswith("bind ")]
    assert binds[-1] == "bind 127.0.0.1 -::1 10.0.0.4"  # the last bind wins
    assert directives[-2:] == [ACL_USER, 'rename-command CONFIG ""']
    assert redis_conf_with_password(conf, "rp-_2", "prayer-room", redis_bind(cluster(tmp_path))) == conf
    single = redis_conf_with_password(debian, "rp-_2", "prayer-room")
    assert "bind" not in single.split("port 6379")[1]  # a single host: as before


def test_the_firewall_admits_postgresql_and_redis_from_the_app_hosts_only_and_fails_closed(tmp_path):
    config = cluster(tmp_path)
    rules = render_firewall(config)
    assert "flush ruleset" not in rules and "22" not in rules and "policy accept" not in rules
    assert "delete table inet prayer_room\n" in rules  # replaced as a whole, atomically
    chain = [line.strip() for line in rules.split("chain input {")[1].split("}\n")[0].splitlines() if line.strip()]
    assert chain == [
        "type filter hook input priority filter; policy drop;",
        'iif "lo" accept',
        "meta l4proto != tcp accept",
        "tcp dport != { 5432, 6379 } accept",
        "ip saddr { 10.0.0.2, 10.0.0.3, 10.0.0.4 } accept",  # not the balancer (10.0.0.5)
    ]
    unit = render_firewall_unit(config)
    assert f"ExecStart=/usr/sbin/nft -f {config.layout.etc}/firewall.nft\n" in unit
    assert "ExecStop=" not in unit and "Before=network-pre.target" in unit  # stopped, the table stays
    assert "WantedBy=sysinit.target" in unit
    dropin = render_after_network_dropin()
    assert "\nAfter=network-online.target prayer-room-firewall.service\n" in dropin
    assert "\nExecStartPre=+/usr/sbin/nft list chain inet prayer_room input\n" in dropin  # no table, no start
    if shutil.which("nft") and os.geteuid() == 0:
        path = tmp_path / "firewall.nft"
        path.write_text(rules)
        checked = subprocess.run(["nft", "--check", "-f", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def test_the_balancer_spreads_over_the_web_hosts_with_passive_health_checks(tmp_path):
    site = render_balancer_site(cluster(tmp_path))
    servers = [line.strip() for line in site.splitlines() if line.strip().startswith("server 10.")]
    assert servers == [f"server 10.0.0.{n}:8443 max_fails=2 fail_timeout=10s;" for n in (2, 3)]
    # Over TLS, each web host's certificate checked against the cluster CA and the web hosts' shared name.
    for line in (
        "proxy_pass https://prayer_room_web_hosts;",
        "proxy_ssl_verify on;",
        "proxy_ssl_trusted_certificate /etc/prayer-room/cluster-ca.crt;",
        "proxy_ssl_name web.prayer-room.cluster;",
    ):
        assert f"\n        {line}\n" in site, line
    # A new connection per request: a dead web host costs proxy_connect_timeout, not a kept-open connection's
    # read timeout.
    assert "keepalive " not in site.split("upstream ")[1].split("}")[0] and "proxy_connect_timeout 2s;" in site
    assert "proxy_next_upstream error timeout http_502 non_idempotent;" in site
    assert "server_tokens off;" in site and "server_name 10.0.0.5;" in site
    default = site.split("server {")[1]
    assert "listen 80 default_server;" in default and "return 444;" in default
    assert int(site.split("client_body_timeout ")[1].split("s;")[0]) < 60
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in site
    # `fab os-update` drains a web host: marked down (by its deploy.toml name or its address), the other unchanged.
    for name in ("root@10.0.0.3", "10.0.0.3"):
        drained = render_balancer_site(cluster(tmp_path), drained=[name])
        servers = [line.strip() for line in drained.splitlines() if line.strip().startswith("server 10.")]
        assert servers == ["server 10.0.0.2:8443 max_fails=2 fail_timeout=10s;",
                           "server 10.0.0.3:8443 max_fails=2 fail_timeout=10s down;"]  # fmt: skip


def test_status_reads_which_web_hosts_the_balancers_upstream_serves_and_which_are_drained(tmp_path):
    config = cluster(tmp_path)
    web_hosts = config.role_hosts("web")
    both = render_balancer_site(config)
    assert upstream_servers(both) == [("10.0.0.2", False), ("10.0.0.3", False)]
    assert upstream_lines("10.0.0.5", web_hosts, both) == ["balancer 10.0.0.5: sends requests to 10.0.0.2, 10.0.0.3"]
    # A web host a failed os-update left drained: named, with what puts it back.
    drained = render_balancer_site(config, drained=["root@10.0.0.3"])
    assert upstream_servers(drained) == [("10.0.0.2", False), ("10.0.0.3", True)]
    lines = upstream_lines("10.0.0.5", web_hosts, drained)
    assert lines[0] == "balancer 10.0.0.5: sends requests to 10.0.0.2"
    drained_line = "ALERT balancer 10.0.0.5: drained (marked down, no request goes to it): 10.0.0.3; put back by "
    assert lines[1].startswith(drained_line + "`fab os-update` ") and "`fab provision`" in lines[1], lines
    # Every web host drained; a web host of deploy.toml the site does not name (provision not run since it was added).
    every = render_balancer_site(config, drained=web_hosts)
    assert upstream_lines("10.0.0.5", web_hosts, every)[0] == "balancer 10.0.0.5: sends requests to no web host"
    assert upstream_lines("10.0.0.5", [*web_hosts, "root@10.0.0.9"], both)[1] == (
        "ALERT balancer 10.0.0.5: not in its upstream: 10.0.0.9; `fab provision`"
    )
    assert upstream_lines("10.0.0.5", web_hosts, None)[0].startswith("ALERT balancer 10.0.0.5: no nginx site at ")
    # IPv6 web hosts (in brackets), a comment, and another upstream block are told apart.
    text = (
        "upstream other {\n    server 10.9.9.9:80 down;\n}\n"
        "upstream prayer_room_web_hosts {\n    # server 10.0.0.7:8443 down;\n"
        "    server [fd00::2]:8443 max_fails=2 fail_timeout=10s;\n"
        "    server [fd00::3]:8443 max_fails=2 fail_timeout=10s down;\n}\n"
    )
    assert upstream_servers(text) == [("fd00::2", False), ("fd00::3", True)]
    assert upstream_servers("") == []


def test_a_web_host_behind_the_balancer_believes_its_forwarded_headers_and_nobody_elses(tmp_path):
    site = render_nginx_site(cluster(tmp_path).at("10.0.0.3"), "10.0.0.3")
    assert "server_name 10.0.0.5;" in site  # the balancer's Host; the address alone gets 444
    assert "set_real_ip_from 10.0.0.5;" in site and "real_ip_header X-Forwarded-For;" in site
    assert 'map $realip_remote_addr $prayer_room_forwarded_proto {\n    default $scheme;\n    "10.0.0.5"' in site
    assert "proxy_set_header X-Forwarded-Proto $prayer_room_forwarded_proto;" in site
    alone = render_nginx_site(
        cluster(tmp_path, CLUSTER_TOML.replace('balancer = ["root@10.0.0.5"]', "")).at("10.0.0.3"), ""
    )
    assert "set_real_ip_from" not in alone and "proxy_set_header X-Forwarded-Proto $scheme;" in alone
    assert "server_name 10.0.0.2 10.0.0.3;" in alone
    # Behind the balancer the site also listens for it on the TLS port with the host's cluster certificate; with no
    # balancer there is none. A cluster without a db host (managed PostgreSQL and Redis) is the same: the balancer
    # reaches the web hosts over TLS checked against the cluster CA, which the primary keeps.
    tls_block = site.split("# The balancer's way in")[1]
    assert "listen 8443 ssl;" in tls_block and "ssl_certificate /etc/prayer-room/tls/web.crt;" in tls_block
    assert "set_real_ip_from 10.0.0.5;" in tls_block and "location / {" in tls_block
    assert "8443" not in alone
    managed = cluster(tmp_path, CLUSTER_TOML.replace('db = ["root@10.0.0.4"]', ""))
    assert render_nginx_site(managed.at("10.0.0.3"), "10.0.0.3").split("# The balancer's way in")[1] == tls_block
    assert render_balancer_site(managed) == render_balancer_site(cluster(tmp_path))
    balancer = render_balancer_site(managed)
    servers = [line.split()[1] for line in balancer.splitlines() if line.strip().startswith("server 10.")]
    assert servers == ["10.0.0.2:8443", "10.0.0.3:8443"], servers
    assert "proxy_pass https://prayer_room_web_hosts;" in balancer and "proxy_ssl_verify on;" in balancer
    assert "proxy_ssl_trusted_certificate /etc/prayer-room/cluster-ca.crt;" in balancer


def test_every_site_of_several_hosts_has_a_cluster_ca_on_the_db_host_or_else_the_primary(tmp_path):
    with_db = cluster(tmp_path)
    assert ca_host(with_db) == "root@10.0.0.4" and is_ca_host(with_db.at("10.0.0.4"))
    assert not any(is_ca_host(with_db.at(address)) for address in ("10.0.0.2", "10.0.0.3", "10.0.0.5"))
    managed = cluster(tmp_path, CLUSTER_TOML.replace('db = ["root@10.0.0.4"]', ""))
    assert uses_cluster_tls(managed) and ca_host(managed) == managed.primary == "root@10.0.0.2"
    assert is_ca_host(managed.at("10.0.0.2")) and not is_ca_host(managed.at("10.0.0.4"))
    # Where the CA is made: openssl; the balancer makes no certificate and gets none.
    assert "openssl" in packages_for(managed.at("10.0.0.2")) and "openssl" not in packages_for(managed.at("10.0.0.5"))
    # Its URLs are the operator's (another host's): left as they are.
    urls = {"DATABASE_URL": "postgres://app:pw@db.internal:5432/app", "CACHE_URL": "rediss://:pw@10.0.0.9:6379/1"}
    assert cluster_env_values(managed, urls) == urls
    assert not uses_cluster_tls(CONFIG) and not is_ca_host(CONFIG)


def test_the_apps_redis_clients_read_the_urls_tls_checks_as_required_and_hostname_checked(tmp_path):
    """The URL provision writes, read by each library the app hands it to (the pinned versions): the broker (kombu),
    the result backend (celery) and Django's cache (django-environ, then redis-py): each verifies the certificate
    against the cluster CA and checks the name."""
    import ssl

    import environ
    import redis
    from celery import Celery
    from celery.backends.redis import RedisBackend
    from kombu import Connection

    url = cluster_env_values(cluster(tmp_path), cluster_defaults(cluster(tmp_path), "10.0.0.2"))["CACHE_URL"]
    ca = "/etc/prayer-room/cluster-ca.crt"
    broker = Connection(url).ssl
    assert broker == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True, "ssl_ca_certs": ca}, broker
    backend = RedisBackend(app=Celery(set_as_current=False), url=url).connparams
    assert backend["connection_class"] is redis.SSLConnection
    assert (backend["ssl_cert_reqs"], backend["ssl_check_hostname"], backend["ssl_ca_certs"]) == (
        ssl.CERT_REQUIRED, True, ca)  # fmt: skip
    cache = environ.Env.cache_url_config(url)
    pool = redis.ConnectionPool.from_url(cache["LOCATION"], **cache["OPTIONS"])
    connection = pool.make_connection()
    assert isinstance(connection, redis.SSLConnection), cache
    assert (connection.cert_reqs, bool(connection.check_hostname), connection.ca_certs) == (ssl.CERT_REQUIRED, True, ca)
    # The weakened settings (the positive control of the cluster e2e's Redis impostor) read as no check at all.
    weak = redis.ConnectionPool.from_url(url.replace("ssl_cert_reqs=required", "ssl_cert_reqs=none")).make_connection()
    assert (weak.cert_reqs, weak.check_hostname) == (ssl.CERT_NONE, False)


@pytest.mark.deploy  # needs the deploy layer's nginx, which pip cannot install
@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed (.ci/setup.d/20-deploy.sh installs it)")
@pytest.mark.parametrize("which", ["balancer", "balancer, a web host drained", "web host"])
def test_nginx_accepts_the_cluster_sites(tmp_path, which):
    config = replace(cluster(tmp_path), etc=str(tmp_path / "etc"))
    # The files the sites name: the cluster CA's certificate, and a web host's certificate signed by it.
    run = functools.partial(subprocess.run, shell=True, check=True, capture_output=True, text=True)
    ca = ca_dir(config)
    run(ca_commands.create_ca(ca, "test CA", 1))
    certificate, key = tls_dir(config) / "web.crt", tls_dir(config) / "web.key"
    request = run(ca_commands.signing_request(key, "web")).stdout
    signed = run(
        ca_commands.sign(ca, request, render_server_extensions("10.0.0.2", ("web.prayer-room.cluster",)), 1, 1)
    )
    Path(certificate).write_text(signed.stdout)
    Path(f"{key}.new").rename(key)
    shutil.copy(ca / "ca.crt", ca_certificate(config))
    text = (
        render_balancer_site(config, ipv6=False, drained=["10.0.0.3"] if "drained" in which else ())
        if which.startswith("balancer")
        else render_nginx_site(config.at("10.0.0.2"), "10.0.0.2", ipv6=False)
    )
    result = nginx_test(tmp_path, text)
    assert result.returncode == 0, result.stderr


# A verifier PostgreSQL 15 stored for CREATE ROLE ... PASSWORD 'pw-_1 with spaces' (pg_authid.rolpassword).
VERIFIER = (
    "SCRAM-SHA-256$4096:ErBgsdbx9YNkEyQbe18gmQ==$imsl5jd70ka6rp3EUdQXQESZ8M5qqKIr9kSvu3C70Ec="
    ":5PHp9QU/n8Dmi1g8xCfEutOI3zNtlckDh+/OK/cnUJ0="
)


def test_the_db_hosts_role_password_is_checked_against_postgresqls_own_verifier():
    assert scram_matches(VERIFIER + "\n", "pw-_1 with spaces")
    assert not scram_matches(VERIFIER, "pw-_1") and not scram_matches("", "x")
    assert not scram_matches("md5" + "0" * 32, "pw-_1 with spaces")  # an md5 password is replaced by scram


def test_with_a_domain_the_balancer_holds_the_certificate_and_the_web_hosts_keep_the_cluster_one(tmp_path):
    config = replace(cluster(tmp_path), domain="prayer.example.org")
    first = render_balancer_site(config)  # no certificate yet: the ACME challenge on plain HTTP
    assert (
        f"location /.well-known/acme-challenge/ {{\n        root {ACME_WEBROOT};" in first and "listen 443" not in first
    )
    site = render_balancer_site(config, tls=True)
    http, https = site.split("server {")[2], site.split("server {")[3]
    assert "acme-challenge" in http and "return 301 https://$host$request_uri;" in http and "proxy_pass" not in http
    assert "listen 443 ssl http2;" in https and "proxy_pass https://prayer_room_web_hosts;" in https
    assert f"ssl_certificate {CERT_DIR}/fullchain.pem;" in https and "server_name prayer.example.org;" in https
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in https  # https, which the web hosts believe from it
    assert "proxy_hide_header Strict-Transport-Security;" in https and "max-age=31536000" in https
    assert "ssl_reject_handshake on;" in site.split("server {")[1]
    web = render_nginx_site(config.at("10.0.0.2"), "10.0.0.2")
    assert "server_name prayer.example.org;" in web and "listen 443" not in web and str(CERT_DIR) not in web
    assert "ssl_certificate /etc/prayer-room/tls/web.crt;" in web  # the cluster's, for the balancer only
    assert packages_for(config.at("10.0.0.5")) == ("nginx", "certbot", "openssl")
    assert "certbot" not in packages_for(config.at("10.0.0.2"))
    values = cluster_defaults(config, "10.0.0.2")
    assert values["ALLOWED_HOSTS"] == "prayer.example.org,127.0.0.1,localhost"


def test_cluster_output_keeps_each_hosts_lines_whole_and_prefixed():
    out, lock = io.StringIO(), threading.Lock()
    web1, web2 = PrefixedLines("[web1] ", out, lock), PrefixedLines("[web2] ", out, lock)
    print("-> pack", file=web1, end="")
    print("-> nginx", file=web2)
    print("ages", file=web1)
    assert out.getvalue() == "[web2] -> nginx\n[web1] -> packages\n"


def test_an_ipv6_cluster_gets_bracketed_urls_and_ipv6_rules(tmp_path):
    text = CLUSTER_TOML.replace("root@10.0.0.", "root@[2001:db8::").replace('"]', ']"]').replace('", "', ']", "')
    config = cluster(tmp_path, text)
    assert config.db_address == "2001:db8::4"
    values = cluster_defaults(config, "2001:db8::2")
    assert "@[2001:db8::4]:5432/" in values["DATABASE_URL"] and redis_password(values, "2001:db8::4") == "rp-_2"
    assert service_key_problems(config, values) == []
    rules = render_firewall(config)
    assert "ip6 saddr { 2001:db8::2, 2001:db8::3, 2001:db8::4 } accept" in rules and "ip saddr" not in rules
    assert "2001:db8::3/128    scram-sha-256" in pg_hba_with_peers("", config, "prayer_room", "prayer_room")
    assert "server [2001:db8::2]:8443 max_fails=2" in render_balancer_site(config)
    if shutil.which("nft") and os.geteuid() == 0:
        path = tmp_path / "firewall.nft"
        path.write_text(rules)
        checked = subprocess.run(["nft", "--check", "-f", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("config", [CONFIG, TLS], ids=["plain", "tls"])
def test_a_site_of_one_host_renders_byte_identical_files_to_a_single_server(config):
    from deploy.config import single_host_site
    from deploy.render.nginx import maintenance_context
    from deploy.render.supervisord import render_supervisord_conf, server_context

    def rendered(config: DeployConfig) -> list:
        env = env_defaults(config, HOST, secret_key="s" * 67, db_password="pw-_1", redis_password="rp-_2")
        return [
            env,
            render_nginx_site(config, HOST),
            render_nginx_site(config, HOST, tls=True),
            maintenance_context(config),
            render_unit(config),
            render_backup_units(config),
            render_supervisord_main(config),
            render_supervisorctl_default(config),
            render_supervisord_conf(server_context(config, env)),
            redis_bind(config),
            directories(config),
            packages_for(config),
            services_for(config),
            has_app(config),
            config.environment_overrides(),
        ]

    site = single_host_site(config, f"root@{HOST}")
    assert not site.multi_host and site.site_hosts == (f"root@{HOST}",)
    assert rendered(site) == rendered(config) == rendered(site.at(HOST))


def test_a_site_of_one_host_writes_the_env_file_a_single_server_got_and_leaves_other_servers_urls_alone():
    from deploy.config import single_host_site
    from deploy.render.env_file import OLD_BROKER_URL

    site = single_host_site(CONFIG, f"root@{HOST}").at(HOST)
    fresh = defaults(site)
    # Its env file is its own shared values merged in: what the one-server path wrote, byte for byte.
    for existing in (None, "# mine\nSECRET_KEY=x\nEMAIL_URL=smtp://mail:25", f"CELERY_BROKER_URL={OLD_BROKER_URL}\n"):
        own = read_env_file(existing) if existing else {}
        assert sync_env_file(existing, shared_env_values(own, fresh), fresh) == merge_env_file(existing, fresh)
    managed = {"DATABASE_URL": "postgres://app:pw@db.internal:5432/app", "CELERY_BROKER_URL": OLD_BROKER_URL}
    values = shared_env_values(managed, fresh)
    assert values["DATABASE_URL"] == managed["DATABASE_URL"]  # kept: the database step leaves it alone
    assert values["CELERY_BROKER_URL"] == fresh["CELERY_BROKER_URL"] and redis_password(values) == "rp-_2"
    assert service_key_problems(site, values) == []  # nothing to share with another host
    assert packages_for(replace(site, domain="prayer.example.org")) == (
        "python3-venv", "postgresql", "redis-server", "nginx", "supervisor", "nftables", "certbot", "openssl",
    )  # fmt: skip


@pytest.mark.parametrize("db", [True, False], ids=["with a db host", "without a db host"])
def test_the_ca_host_is_provisioned_first_and_every_host_gets_the_clusters_ca(tmp_path, monkeypatch, db):
    """provision's order (the steps themselves replaced): the CA host, the db host or else the primary, runs alone
    before the others begin, and every host's phase gets the cluster CA, held on the CA host's connection."""
    from fabric import Connection

    import deploy.provision as provisioning

    config = cluster(tmp_path, CLUSTER_TOML if db else CLUSTER_TOML.replace('db = ["root@10.0.0.4"]', ""))
    servers = {}
    monkeypatch.setattr(provisioning, "connect_for_provision", lambda conn, _: servers.setdefault(conn.host, object()))
    monkeypatch.setattr(provisioning, "site_env_values", lambda server, name: {})
    events, cas, recording = [], [], threading.Lock()
    another_began = threading.Event()
    caller, threads_before = threading.current_thread(), set(threading.enumerate())

    def host_steps(values, ca, lock_held=False):
        cas.append(ca)

        def phase(member):
            with recording:
                first_to_begin = not events
                events.append(("begin", member.conn.host))
            if not first_to_begin:
                another_began.set()
            # The first phase ends at once when nothing can run beside it (provision's own thread, no thread started
            # since, all joined); otherwise it waits for another phase to begin, so that an overlap is recorded.
            elif threading.current_thread() is not caller or {*threading.enumerate()} - threads_before:
                another_began.wait(timeout=10)
            with recording:
                events.append(("end", member.conn.host))

        return phase

    monkeypatch.setattr(provisioning, "_host_steps", host_steps)
    conns = [Connection(host.split("@")[1], user="root") for host in config.site_hosts]
    provisioning.provision(conns, config, out=io.StringIO())
    first = "10.0.0.4" if db else "10.0.0.2"
    assert events[:2] == [("begin", first), ("end", first)], events
    assert sorted(host for what, host in events[2:] if what == "begin") == sorted(
        host.split("@")[1] for host in config.site_hosts if not host.endswith(first)
    )
    assert len(cas) == 1 and cas[0].server is servers[first]
