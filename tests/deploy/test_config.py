"""deploy.toml: named environments into a frozen DeployConfig, refused with a clear error before any host."""

import dataclasses
from pathlib import Path, PurePosixPath

import pytest

from deploy.config import DEFAULT_CONFIG_FILE, DeployConfig, load_config, single_host_site
from deploy.errors import DeployError
from deploy.layout import WEB_PORTS


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return path


def test_the_committed_config_loads_every_environment():
    assert load_config(DEFAULT_CONFIG_FILE).name == "default"
    production = load_config(DEFAULT_CONFIG_FILE, "production")
    assert production.hosts and production.domain
    assert production.web_ports == WEB_PORTS
    assert load_config(DEFAULT_CONFIG_FILE, "staging").web_workers == 1


def test_without_a_file_the_defaults_serve_dash_h(tmp_path):
    config = load_config(tmp_path / "absent.toml")
    assert config == DeployConfig()
    assert config.layout.root == PurePosixPath("/srv/prayer-room")
    assert config.layout.programs_conf == PurePosixPath("/etc/prayer-room/programs.conf")


def test_environment_values_override_defaults_and_config_is_frozen(tmp_path):
    path = write(
        tmp_path,
        """
        [defaults]
        user = "app"
        workers = 2
        env = { LOG_LEVEL = "info", A = "1" }
        [environments.prod]
        hosts = ["deploy@example.org:2222"]
        root = "/opt/app"
        workers = 3
        env = { A = "2" }
        """,
    )
    config = load_config(path, "prod")
    assert (config.user, config.workers, config.root) == ("app", 3, "/opt/app")
    assert config.hosts == ("deploy@example.org:2222",)
    assert dict(config.extra_env) == {"LOG_LEVEL": "info", "A": "2"}
    assert config.layout.releases == PurePosixPath("/opt/app/releases")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.user = "root"


_ALIASES = "[defaults]\ndomain = 'p.example.org'\nacme_email = 'a@b.org'\n"


@pytest.mark.parametrize(
    "text, environment, message",
    [
        ("[environments.prod]\n", "staging", "unknown environment 'staging'.*known: prod"),
        ("[defaults]\nusr = 'x'\n", None, "unknown setting\\(s\\) usr"),
        ("[server]\n", None, "unknown table\\(s\\) server"),
        ("[defaults]\nworkers = '2'\n", None, "workers must be a int"),
        ("[defaults]\nrequire_systemd = 1\n", None, "require_systemd must be a bool"),
        ("[defaults]\nweb_workers = 0\n", None, "web_workers must be at least 1"),
        ("[defaults]\nkeep_releases = 1\n", None, "keep_releases must be at least 2"),
        ("[defaults]\nroot = 'srv'\n", None, "root must be an absolute directory"),
        ("[defaults]\nroot = '/tmp'\n", None, "root must be an absolute directory"),
        ("[defaults]\nuser = 'Bad User'\n", None, "not a valid Unix user name"),
        ("[defaults]\nuser = 'a-user-name-of-twenty-seven'\n", None, "too long for its build user"),
        ("[defaults]\nweb_ports = [8001, 8001]\n", None, "web_ports must be distinct"),
        ("[defaults]\nweb_ports = []\n", None, "web_ports must be a list of TCP ports"),
        ("[environments.p]\nhosts = 'root@x'\n", "p", "hosts must be a list"),
        ("[environments.p]\nhosts = ['root@bad host']\n", "p", "is not user@host"),
        ("[defaults]\nenv = { A = 1 }\n", None, "env must be a table of strings"),
        ("not toml = = \n", None, "is not valid TOML"),
        ("[defaults]\ndomain = '203.0.113.7'\nacme_email = 'a@b.org'\n", None, "not a DNS name .* not an address"),
        ("[defaults]\ndomain = 'localhost'\nacme_email = 'a@b.org'\n", None, "not a DNS name"),
        ("[defaults]\ndomain = 'bad_name.org'\nacme_email = 'a@b.org'\n", None, "not a DNS name"),
        ("[defaults]\ndomain = 'p.example.org'\n", None, "domain needs acme_email .*admin@p.example.org"),
        ("[defaults]\nacme_email = 'a@b.org'\n", None, "acme_email set without domain"),
        ("[defaults]\nacme_directory = 'https://x/d'\n", None, "acme_directory set without domain"),
        ("[defaults]\naliases = ['www.p.example.org']\n", None, "aliases set without domain"),
        (_ALIASES + "aliases = 'www.p.example.org'\n", None, "aliases must be a list of host names"),
        (_ALIASES + "aliases = ['https://www.p.example.org/']\n", None, "alias 'https://.*' is not a host name"),
        (_ALIASES + "aliases = ['*.p.example.org']\n", None, "alias .* is not a host name"),
        (_ALIASES + "aliases = ['www.p.example.org:8443']\n", None, "alias .* is not a host name"),
        (_ALIASES + "aliases = ['P.example.org']\n", None, "alias 'P.example.org' is the domain itself"),
        (_ALIASES + "aliases = ['www.p.example.org', 'WWW.p.example.org']\n", None, "alias .* is listed twice"),
        (
            "[defaults]\ndomain = 'p.example.org'\nacme_email = 'a@b.org'\nacme_directory = 'http://x/dir'\n",
            None,
            "acme_directory must be an https:// URL",
        ),
        (
            "[defaults]\ndomain = 'p.example.org'\nacme_email = 'a@b.org'\nacme_ca_bundle = 'absent.pem'\n",
            None,
            "acme_ca_bundle .*absent.pem cannot be read",
        ),
    ],
)
def test_bad_config_is_refused_naming_the_setting(tmp_path, text, environment, message):
    with pytest.raises(DeployError, match=message):
        load_config(write(tmp_path, text), environment)


def test_aliases_are_kept_in_order_beside_the_domain_and_leave_allowed_hosts_alone(tmp_path):
    config = load_config(write(tmp_path, _ALIASES + "aliases = ['www.p.example.org', 'old.example.net']\n"))
    assert config.aliases == ("www.p.example.org", "old.example.net")
    # nginx redirects the aliases: Django only ever sees the domain.
    assert dict(config.environment_overrides())["ALLOWED_HOSTS"] == "p.example.org,127.0.0.1,localhost"


def test_acme_ca_bundle_is_relative_to_the_config_file_and_must_hold_a_certificate(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    tls = "[defaults]\ndomain = 'p.example.org'\nacme_email = 'a@b.org'\n"
    config = load_config(write(tmp_path, tls + "acme_ca_bundle = 'ca.pem'\n"))
    assert config.acme_ca_bundle == str(tmp_path / "ca.pem")
    assert config.acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
    with pytest.raises(DeployError, match="key.pem holds no PEM certificate"):
        load_config(write(tmp_path, tls + "acme_ca_bundle = 'key.pem'\n"))


def test_a_domain_sets_the_host_https_and_secure_cookies_over_the_env_file_at_every_deploy():
    overrides = dict(DeployConfig(domain="p.example.org", acme_email="a@b.org").environment_overrides())
    assert overrides["ALLOWED_HOSTS"] == "p.example.org,127.0.0.1,localhost"
    assert overrides["CSRF_TRUSTED_ORIGINS"] == "https://p.example.org"
    assert overrides["SECURE_SSL_REDIRECT"] == overrides["SECURE_COOKIES"] == "true"
    plain = dict(DeployConfig().environment_overrides())
    assert not {"ALLOWED_HOSTS", "SECURE_SSL_REDIRECT", "SECURE_COOKIES"} & set(plain)  # the env file's values
    explicit = DeployConfig(domain="p.example.org", extra_env=(("ALLOWED_HOSTS", "p.example.org,www.p.example.org"),))
    assert dict(explicit.environment_overrides())["ALLOWED_HOSTS"] == "p.example.org,www.p.example.org"


def test_an_environment_needs_a_config_file(tmp_path):
    with pytest.raises(DeployError, match="unknown environment 'prod': there is no deploy config"):
        load_config(tmp_path / "absent.toml", "prod")


def test_fab_refuses_an_unknown_environment_before_any_host(tmp_path):
    import subprocess
    import sys

    fab = Path(sys.executable).parent / "fab"
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([fab, "-r", repo, "deploy", "--env", "nope"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: unknown environment 'nope' in {repo / 'deploy.toml'}; known: production, staging."
    ]
    assert result.stdout == ""


CLUSTER = """
[environments.cluster.roles]
web = ["root@10.0.0.2", "root@10.0.0.3"]
worker = ["root@10.0.0.4"]
beat = ["root@10.0.0.4", "root@10.0.0.3"]
db = ["root@10.0.0.4"]
balancer = ["root@10.0.0.5:2222"]
"""


def test_roles_make_a_cluster_and_each_host_gets_its_own_roles(tmp_path):
    config = load_config(write(tmp_path, CLUSTER), "cluster")
    assert config.multi_host and config.primary == "root@10.0.0.2"
    assert config.site_hosts == ("root@10.0.0.2", "root@10.0.0.3", "root@10.0.0.4", "root@10.0.0.5:2222")
    assert config.db_address == "10.0.0.4"
    assert config.app_addresses == ("10.0.0.2", "10.0.0.3", "10.0.0.4")  # not the balancer
    app = config.for_host("root@10.0.0.4")
    assert app.host_roles == {"worker", "beat", "db"} and app.hosts == ("root@10.0.0.4",)
    assert ("WORKER_QUEUES", "celery,host.10.0.0.4") in app.environment_overrides()
    assert config.at("10.0.0.5").host_roles == {"balancer"} and config.at("10.0.0.5").hosts == ("root@10.0.0.5:2222",)
    with pytest.raises(DeployError, match="10.0.0.9 is not a host of the environment cluster"):
        config.at("10.0.0.9")
    web = config.for_host("root@10.0.0.2")
    assert web.host_roles == {"web"} and not any(k == "WORKER_QUEUES" for k, _ in web.environment_overrides())


def test_a_single_host_is_a_site_of_one_holding_every_role_but_balancer(tmp_path):
    single = load_config(write(tmp_path, '[environments.one]\nhosts = ["root@h"]\n'), "one")
    roles = "".join(f'{role} = ["root@h"]\n' for role in ("web", "worker", "beat", "db"))
    named = load_config(write(tmp_path, f"[environments.one.roles]\n{roles}"), "one")
    for config in (single, named, single_host_site(load_config(write(tmp_path, "")), "root@h")):
        assert config.site_hosts == ("root@h",) and not config.multi_host and config.primary == "root@h"
        roles = ("web", "worker", "beat", "db", "balancer")
        assert [config.role_hosts(role) for role in roles] == [("root@h",)] * 4 + [()]
        assert config.roles_of("root@h") == {"web", "worker", "beat", "db"} and config.db_address == "127.0.0.1"
        assert config.at("h") == config.at("203.0.113.9") == config.for_host("root@h")
        assert config.for_host("root@h").hosts == ("root@h",)
        assert config.host_roles == {"web", "worker", "beat", "db"} and config.host_queue == ""
    assert load_config(write(tmp_path, "")).site_hosts == ()


@pytest.mark.parametrize(
    "text, message",
    [
        ('hosts = ["root@a", "root@b"]\n', "2 hosts and no roles: each would get its own PostgreSQL"),
        ('hosts = ["root@a"]\nroles = { web = ["root@b"], worker = ["root@b"], beat = ["root@b"] }\n',
         "hosts and roles both set"),
        ('roles = { web = ["root@b"], beat = ["root@b"] }\n', "roles has no worker host"),
        ('roles = { web = ["root@b"], worker = ["root@b"], beat = ["root@b"], cache = ["root@c"] }\n',
         "unknown role\\(s\\) cache"),
        ('roles = { web = ["root@b"], worker = ["root@b"], beat = ["root@b"], db = ["root@c", "root@d"] }\n',
         "db must be one host"),
        ('roles = { web = ["root@b", "root@b"], worker = ["root@b"], beat = ["root@b"] }\n', "web names a host twice"),
        ('roles = { web = ["root@b"], worker = ["deploy@b"], beat = ["root@b"] }\n', "are the same server"),
        ('roles = { web = "root@b", worker = ["root@b"], beat = ["root@b"] }\n', "web must be a list of hosts"),
        ('roles = { web = ["root@b"], worker = ["root@b"], beat = ["root@b"], balancer = ["root@b"] }\n',
         "balancer host cannot be a web host"),
        ('domain = "x.example.org"\nacme_email = "a@example.org"\n'
         'roles = { web = ["root@b"], worker = ["root@c"], beat = ["root@c"] }\n',
         "domain on a cluster needs a balancer"),
    ],
)  # fmt: skip
def test_bad_roles_are_refused_with_what_to_do(tmp_path, text, message):
    with pytest.raises(DeployError, match=message):
        load_config(write(tmp_path, "[environments.c]\n" + text), "c")


def test_roles_in_defaults_are_refused(tmp_path):
    path = write(tmp_path, '[defaults]\nroles = { web = ["root@b"], worker = ["root@b"], beat = ["root@b"] }\n')
    with pytest.raises(DeployError, match="roles belong to an environment"):
        load_config(path)
