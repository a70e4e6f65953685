"""What `fab provision` renders and refuses, without a server: each file checked by what reads it."""

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest
from supervisor.options import ClientOptions, ServerOptions

from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.layout import WEB_PORTS
from deploy.onserver import read_env_file
from deploy.progress import Progress
from deploy.provision import summary
from deploy.server_files import (
    ACME_WEBROOT,
    CERT_DIR,
    FACTS_SCRIPT,
    SUPERVISORCTL_DEFAULT,
    UNIT,
    acme_ca_path,
    certbot_command,
    certificate_fits,
    certificate_line,
    check_facts,
    directories,
    env_defaults,
    merge_env_file,
    parse_certificate,
    parse_facts,
    redis_conf_with_password,
    redis_password,
    render_backup_units,
    render_certbot_dropin,
    render_nginx_site,
    render_supervisorctl_default,
    render_supervisord_main,
    render_unit,
)

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
        "'backend': s.CELERY_RESULT_BACKEND}, default=str))"
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
    assert settings["broker"] == settings["backend"] == "redis://:rp-_2@127.0.0.1:6379/0"
    assert settings["cache"]["LOCATION"] == "redis://:rp-_2@127.0.0.1:6379/1"
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
    assert values["CELERY_BROKER_URL"] == "redis://:rp-_2@127.0.0.1:6379/0" and merged.startswith("SECRET_KEY=x\n")
    assert merged.count("CELERY_BROKER_URL=") == 1
    assert redis_password({"CELERY_BROKER_URL": "redis://:pw@redis.internal:6379/0"}) is None
    assert redis_password({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}) is None


def test_redis_conf_gets_the_password_last_and_a_new_one_replaces_it():
    debian = "bind 127.0.0.1 -::1\n# requirepass foobared\nport 6379\n"
    first = redis_conf_with_password(debian, "rp-_2")
    assert first.startswith(debian) and "\nrequirepass rp-_2\n" in first
    assert redis_conf_with_password(first, "rp-_2") == first
    second = redis_conf_with_password(first, "other")
    assert "rp-_2" not in second and second.count("requirepass ") == 2  # the commented example, and ours
    last = [line for line in second.splitlines() if line and not line.startswith("#")][-2:]
    assert last == ["requirepass other", 'rename-command CONFIG ""']


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
def test_nginx_accepts_the_site(tmp_path):
    (tmp_path / "logs").mkdir()
    site = tmp_path / "site.conf"
    site.write_text(render_nginx_site(DeployConfig(domain="prayer.example.org"), HOST, ipv6=False))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{ access_log off; include {site}; }}\n"
    )
    result = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_nginx_site_answers_503_with_retry_after_while_the_maintenance_flag_exists():
    site = render_nginx_site(CONFIG, HOST)
    assert f"if (-f {CONFIG.layout.maintenance_flag}) {{\n        return 503;" in site
    assert "add_header Retry-After 30 always;" in site and "<h1>Back in a moment</h1>" in site
    assert 'return 503 "<!doctype html> <html lang=\\"en\\">' in site  # quotes escaped for nginx


def test_the_backup_timer_runs_the_root_copy_of_the_helper_daily_and_keeps_backup_keep():
    service, timer = render_backup_units(dataclasses.replace(CONFIG, backup_keep=3))
    assert "Type=oneshot" in service and "After=postgresql.service" in service
    expected = (
        f"ExecStart=python3 {CONFIG.layout.etc}/onserver.py --env-file {CONFIG.layout.env_file} backup --dir "
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
