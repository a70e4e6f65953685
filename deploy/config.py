"""Deploy configuration: deploy.toml's [defaults] and one [environments.NAME], checked once, before any host."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

from deploy.app import SETTINGS_MODULE
from deploy.errors import DeployError
from deploy.layout import WEB_PORTS, ServerLayout

REPO_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_DIR / "deploy.toml"
SECRETS_FILE = "deploy.secrets"

LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
# What a host of a site can be: the programs it runs (web, worker, beat), the shared PostgreSQL and Redis (db)
# and the front server in front of the web hosts (balancer). A site of one host holds APP_ROLES + db.
APP_ROLES = ("web", "worker", "beat")
ROLES = (*APP_ROLES, "db", "balancer")
SINGLE_HOST_ROLES = frozenset((*APP_ROLES, "db"))
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_HOST = re.compile(r"(?:[^@\s]+@)?[A-Za-z0-9.\-\[\]:]+")


@dataclass(frozen=True)
class DeployConfig:
    """Everything a deploy needs to know about one environment; built by `load_config`."""

    name: str = "default"
    hosts: tuple[str, ...] = ()
    domain: str = ""
    # Other names of the site (e.g. www.DOMAIN): in the one certificate, each redirecting (301) to `domain`.
    aliases: tuple[str, ...] = ()
    # TLS for `domain` (certbot, webroot mode): the ACME account's email, the ACME directory, and a local PEM
    # file trusted only for talking to that ACME server (a staging or test CA).
    acme_email: str = ""
    acme_directory: str = LETSENCRYPT
    acme_ca_bundle: str = ""
    user: str = "prayer-room"
    root: str = "/srv/prayer-room"
    etc: str = "/etc/prayer-room"
    backup_dir: str = "/var/backups/prayer-room"
    backup_keep: int = 14
    postgres_bin: str = ""
    run: str = "/run/prayer-room"
    sbin: str = "/usr/local/sbin"  # root's commands on the server (prayer-room-manage)
    python: str = "python3"
    supervisorctl: str = "supervisorctl"
    settings_module: str = SETTINGS_MODULE
    web_workers: int = 2
    worker_concurrency: int = 2
    workers: int = 1
    web_graceful_timeout: int = 20
    task_time_limit: int = 300
    keep_releases: int = 5
    lock_expiry_seconds: int = 600
    health_timeout: int = 60
    # nginx's limits per client address (0: none): POSTs to /admin/login/, and to the public write endpoints
    # (a new request, "prayed", "flag"); past a burst of as many, 429. The API's own throttles count per hour.
    login_rate_per_minute: int = 10
    write_rate_per_minute: int = 60
    # The load balancers or CDN in front of the site's front server (the single server, or the cluster's balancer;
    # the web hosts of a cluster without one): their addresses or networks (CIDR). nginx takes the client's address
    # from their X-Forwarded-For (and from nobody else's), so rate limits, lockouts and throttles count per client.
    trusted_proxies: tuple[str, ...] = ()
    require_systemd: bool = True
    web_ports: tuple[int, ...] = WEB_PORTS
    extra_env: tuple[tuple[str, str], ...] = field(default=())
    # Continuous archiving (pgBackRest on the db host) to an S3-compatible bucket, encrypted: off while
    # backup_repository is empty. Checked by validate_archive; rendered by deploy/render/archive.py.
    backup_repository: str = ""
    backup_s3_endpoint: str = ""
    backup_s3_region: str = "us-east-1"
    backup_s3_uri_style: str = "host"
    backup_s3_ca_bundle: str = ""
    backup_full_schedule: str = "Sun *-*-* 01:30:00"
    backup_diff_schedule: str = "Mon..Sat *-*-* 01:30:00"
    backup_verify_schedule: str = "*-*-* 04:30:00"
    backup_full_keep: int = 4
    backup_diff_keep: int = 7
    # Where fab's announcements and the watchdog's alerts go: webhook URLs (a JSON POST) and email addresses (sent
    # through the app's EMAIL_URL). Checked by validate_notify.
    notify: tuple[str, ...] = ()
    # The deploy.toml this config was read from (or would be): the operator's git-ignored secrets file
    # (`secrets_file`) lives beside it. Set by load_config, never by the file itself; not part of what the config
    # says (equality).
    config_file: str = field(default=str(DEFAULT_CONFIG_FILE), compare=False)
    # role -> the hosts that have it: [environments.NAME.roles], or every role but balancer on the one host of
    # `hosts` (`single_host_site`); empty only while no host is known (the defaults, before -H).
    roles: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The roles of the one host this config is bound to (`for_host`); a site of one host has them all but balancer.
    host_roles: frozenset[str] = SINGLE_HOST_ROLES

    @property
    def build_user(self) -> str:
        """The unprivileged user collectstatic runs as: a uid of its own, so the app user cannot write what it
        collects (nginx serves it) nor touch the process while it runs."""
        return f"{self.user}-build"

    @property
    def secrets_file(self) -> Path:
        """The operator's secrets file beside deploy.toml (git-ignored, KEY=value lines): the archive's BACKUP_*."""
        return Path(self.config_file).parent / SECRETS_FILE

    @property
    def site_hosts(self) -> tuple[str, ...]:
        """Every host of the site once, in the order the roles first name them (a site of one host: that one)."""
        return tuple(dict.fromkeys(host for _, hosts in self.roles for host in hosts))

    @property
    def multi_host(self) -> bool:
        """Whether the site spans several hosts: then PostgreSQL and Redis listen on the db host's address behind a
        firewall, each host's workers have a queue of their own, and a balancer may front the web hosts."""
        return len(self.site_hosts) > 1

    def role_hosts(self, role: str) -> tuple[str, ...]:
        """The hosts (user@host[:port]) that have `role`, in the config's order."""
        return dict(self.roles).get(role, ())

    def roles_of(self, host: str) -> frozenset[str]:
        return frozenset(role for role, hosts in self.roles if host in hosts)

    def for_host(self, host: str) -> DeployConfig:
        """This config bound to one host of the site: `hosts` is that host, `host_roles` its roles."""
        return replace(self, hosts=(host,), host_roles=self.roles_of(host))

    def at(self, address: str) -> DeployConfig:
        """`for_host` for the host of the site at `address` (a Connection's host); a site of one host: bound to that
        host whatever the address (-H may name it another way); a config with no host yet: as it is."""
        if not self.multi_host:
            return self.for_host(self.site_hosts[0]) if self.site_hosts else self
        for host in self.site_hosts:
            if address_of(host) == address:
                return self.for_host(host)
        hosts = ", ".join(self.site_hosts)
        raise DeployError(f"{address} is not a host of the environment {self.name}; its hosts: {hosts}.")

    @property
    def primary(self) -> str:
        """The host that migrates, seeds the schedules, verifies writes and keeps the backups: the first web host."""
        web = self.role_hosts("web")
        return web[0] if web else (self.hosts[0] if self.hosts else "")

    @property
    def db_address(self) -> str:
        """The address the programs reach PostgreSQL and Redis at: loopback on a site of one host (or before its host
        is known), else the db host's; "" when the roles name no db host (the operator's managed services)."""
        db = self.role_hosts("db")
        if self.roles and not db:
            return ""
        return address_of(db[0]) if self.multi_host else "127.0.0.1"

    @property
    def app_addresses(self) -> tuple[str, ...]:
        """The addresses of the hosts that run the app (web, worker, beat): the only ones the db host's firewall and
        pg_hba.conf admit (not the balancer's, which reaches neither PostgreSQL nor Redis)."""
        return tuple(dict.fromkeys(address_of(h) for role in APP_ROLES for h in self.role_hosts(role)))

    def runs(self, role: str) -> bool:
        return role in self.host_roles

    @property
    def host_queue(self) -> str:
        """The Celery queue only this host's workers consume besides the shared one: the deploy's ping goes there."""
        return f"host.{address_of(self.hosts[0])}" if self.multi_host and self.hosts else ""

    @property
    def layout(self) -> ServerLayout:
        return ServerLayout(
            root=PurePosixPath(self.root),
            etc=PurePosixPath(self.etc),
            backups=PurePosixPath(self.backup_dir),
            run=PurePosixPath(self.run),
            sbin=PurePosixPath(self.sbin),
        )

    def environment_defaults(self) -> list[tuple[str, str]]:
        """Variables the env file may override, for the programs and the deploy's own commands alike."""
        return [("DJANGO_SETTINGS_MODULE", self.settings_module)]

    def environment_overrides(self) -> list[tuple[str, str]]:
        """Variables set over the env file: this config's process counts and time limits, what `domain` implies
        (its host name, HTTPS only, Secure cookies: at every deploy, whatever the env file says), then its `env`."""
        tls = (
            [
                ("ALLOWED_HOSTS", f"{self.domain},127.0.0.1,localhost"),
                ("CSRF_TRUSTED_ORIGINS", f"https://{self.domain}"),
                ("SECURE_SSL_REDIRECT", "true"),
                ("SECURE_COOKIES", "true"),
            ]
            if self.domain
            else []
        )
        return [
            ("WEB_WORKERS", str(self.web_workers)),
            ("WORKER_CONCURRENCY", str(self.worker_concurrency)),
            ("CELERY_TASK_TIME_LIMIT", str(self.task_time_limit)),
            ("WEB_GRACEFUL_TIMEOUT", str(self.web_graceful_timeout)),
            # Each release collects and serves its own static files (releases/<id>/static), over an older
            # env file's shared STATIC_ROOT.
            ("STATIC_ROOT", "release"),
            *tls,
            *([("WORKER_QUEUES", f"celery,{self.host_queue}")] if self.host_queue and self.runs("worker") else []),
            *self.extra_env,
        ]


def single_host_site(config: DeployConfig, host: str) -> DeployConfig:
    """`config` as a site of one host holding web, worker, beat and db: what `hosts = [host]` or `-H host` means."""
    roles = tuple((role, (host,)) for role in (*APP_ROLES, "db"))
    return replace(config, hosts=(host,), roles=roles, host_roles=SINGLE_HOST_ROLES)


def has_app(config: DeployConfig) -> bool:
    """Whether the host `config` is bound to runs the app (web, worker or beat): a db or balancer host alone has no
    app user, layout, env file or supervisord, and deploy skips it."""
    return bool(config.host_roles & set(APP_ROLES))


def address_of(host: str) -> str:
    """The address part of user@host[:port] (an IPv6 address in brackets loses them)."""
    address = host.rpartition("@")[2]
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") == 1:
        address = address.partition(":")[0]
    return address


_FIELD_TYPES = {f.name: f.type for f in fields(DeployConfig)}
_SETTABLE = set(_FIELD_TYPES) - {"name", "extra_env", "host_roles", "config_file"} | {"env"}


def load_config(path: Path | None = None, environment: str | None = None) -> DeployConfig:
    """The config for `environment` (or the defaults) from `path`, or the built-in defaults without a file.

    Raises DeployError naming the file and the key for an unknown environment or a bad value.
    """
    path = path or DEFAULT_CONFIG_FILE
    if not path.is_file():
        if environment:
            raise DeployError(f"unknown environment {environment!r}: there is no deploy config at {path}.")
        return DeployConfig(config_file=str(path))
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise DeployError(f"{path} is not valid TOML: {exc}") from exc
    unknown_tables = sorted(set(data) - {"defaults", "environments"})
    if unknown_tables:
        raise DeployError(f"{path}: unknown table(s) {', '.join(unknown_tables)}: use [defaults], [environments.NAME].")
    defaults = data.get("defaults", {})
    environments = data.get("environments", {})
    values = dict(_checked(defaults, f"{path} [defaults]"))
    name = "default"
    if environment:
        if environment not in environments:
            known = ", ".join(sorted(environments)) or "none"
            raise DeployError(f"unknown environment {environment!r} in {path}; known: {known}.")
        values.update(_checked(environments[environment], f"{path} [environments.{environment}]"))
        name = environment
    env = {**defaults.get("env", {}), **(environments.get(environment, {}).get("env", {}) if environment else {})}
    values.pop("env", None)
    if "roles" in defaults:
        raise DeployError(f"{path} [defaults]: roles belong to an environment: [environments.NAME.roles].")
    for bundle in ("acme_ca_bundle", "backup_s3_ca_bundle"):  # relative to the config file, like a command line's
        if values.get(bundle):
            values[bundle] = str((path.parent / Path(values[bundle]).expanduser()).resolve())
    config = DeployConfig(name=name, extra_env=tuple(sorted(env.items())), config_file=str(path.resolve()), **values)
    validate(config, str(path))
    return single_host_site(config, config.hosts[0]) if config.hosts else config


def _checked(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise DeployError(f"{where} must be a table of settings.")
    unknown = sorted(set(table) - _SETTABLE)
    if unknown:
        raise DeployError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_SETTABLE))}.")
    values = {}
    for key, value in table.items():
        if key == "env":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise DeployError(f'{where}: env must be a table of strings, e.g. env = {{ LOG_LEVEL = "info" }}.')
            values[key] = value
        elif key == "web_ports":
            if not isinstance(value, list) or not value or not all(type(p) is int and 0 < p < 65536 for p in value):
                raise DeployError(f"{where}: web_ports must be a list of TCP ports, e.g. [8001, 8002].")
            values[key] = tuple(value)
        elif key == "aliases":
            if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
                raise DeployError(f'{where}: aliases must be a list of host names, e.g. ["www.example.org"].')
            values[key] = tuple(value)
        elif key == "hosts":
            if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
                raise DeployError(f'{where}: hosts must be a list of strings, e.g. ["root@203.0.113.7"].')
            values[key] = tuple(value)
        elif key == "trusted_proxies":
            if not isinstance(value, list) or not all(isinstance(network, str) for network in value):
                raise DeployError(
                    f'{where}: trusted_proxies must be a list of addresses or networks, e.g. ["10.0.0.0/8"].'
                )
            values[key] = tuple(value)
        elif key == "notify":
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise DeployError(
                    f"{where}: notify must be a list of webhook URLs and email addresses, e.g. notify = "
                    '["https://hooks.example.org/T0/B0/XXXX", "ops@example.org"].'
                )
            values[key] = tuple(value)
        elif key == "roles":
            values[key] = _checked_roles(value, f"{where[:-1]}.roles]" if where.endswith("]") else where)
        else:
            expected = {"int": int, "bool": bool, "str": str}[_FIELD_TYPES[key]]
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise DeployError(f"{where}: {key} must be a {expected.__name__}, got {value!r}.")
            values[key] = value
    return values


def _checked_roles(table: Any, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    example = 'web = ["root@10.0.0.2", "root@10.0.0.3"], worker = ["root@10.0.0.4"], beat = ["root@10.0.0.4"]'
    if not isinstance(table, dict):
        raise DeployError(f"{where} must be a table of role = [hosts], e.g. {example}.")
    unknown = sorted(set(table) - set(ROLES))
    if unknown:
        raise DeployError(f"{where}: unknown role(s) {', '.join(unknown)}; roles: {', '.join(ROLES)}.")
    for role, hosts in table.items():
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise DeployError(f'{where}: {role} must be a list of hosts, e.g. {role} = ["root@10.0.0.2"].')
        if len(set(hosts)) != len(hosts):
            raise DeployError(f"{where}: {role} names a host twice: {hosts}.")
    return tuple((role, tuple(table[role])) for role in ROLES if table.get(role))


def validate_roles(config: DeployConfig, where: str) -> None:
    """Roles name web, worker and beat hosts, at most one db and one balancer host, and come without a `hosts` list;
    several hosts without roles would be several separate sites sharing nothing."""
    if config.hosts and config == single_host_site(config, config.hosts[0]):
        return  # already a site of its one host
    if not config.roles:
        if len(config.hosts) > 1:
            raise DeployError(
                f"{where}: {len(config.hosts)} hosts and no roles: each would get its own PostgreSQL, Redis and "
                "beat (two sites, every periodic task twice). List one host, or give the environment "
                '[environments.NAME.roles] (web = [...], worker = [...], beat = [...], db = ["..."]).'
            )
        return
    if config.hosts:
        raise DeployError(f"{where}: hosts and roles both set; with roles, list each host under its roles only.")
    missing = [role for role in APP_ROLES if not config.role_hosts(role)]
    if missing:
        raise DeployError(f"{where}: roles has no {', '.join(missing)} host; a site needs web, worker and beat.")
    for role in ("db", "balancer"):
        if len(config.role_hosts(role)) > 1:
            raise DeployError(
                f"{where}: {role} must be one host, got {len(config.role_hosts(role))}"
                + (" (one PostgreSQL and Redis for all)." if role == "db" else " (one front server).")
            )
    for host in config.site_hosts:
        if not _HOST.fullmatch(host):
            raise DeployError(f"{where}: host {host!r} is not user@host[:port].")
    by_address: dict[str, str] = {}
    for host in config.site_hosts:
        other = by_address.setdefault(address_of(host), host)
        if other != host:
            raise DeployError(f"{where}: {other!r} and {host!r} are the same server; name it one way in every role.")
    if config.role_hosts("balancer") and set(config.role_hosts("balancer")) & set(config.role_hosts("web")):
        raise DeployError(f"{where}: the balancer host cannot be a web host too (both need ports 80 and 443).")
    if config.multi_host and config.domain and not config.role_hosts("balancer"):
        raise DeployError(
            f"{where}: domain on a cluster needs a balancer host, which holds the certificate; add balancer = "
            '["root@..."] to roles (or leave domain out and terminate TLS on your own load balancer).'
        )


def validate(config: DeployConfig, where: str = "deploy config") -> None:
    """Refuse values that would break the server, naming the setting."""
    if not _USER.fullmatch(config.user):
        raise DeployError(f"{where}: user {config.user!r} is not a valid Unix user name.")
    if not _USER.fullmatch(config.build_user):
        raise DeployError(f"{where}: user {config.user!r} is too long for its build user {config.build_user!r}.")
    for key in ("root", "etc", "backup_dir", "run", "sbin"):
        value = getattr(config, key)
        if not value.startswith("/") or value.rstrip("/") in ("", "/tmp") or ".." in value.split("/"):
            raise DeployError(f"{where}: {key} must be an absolute directory other than / and /tmp, got {value!r}.")
    # The paths and commands go unquoted into files root runs (supervisord programs, units, nginx): a newline in
    # `root` would add a program running as root. Only a safe set of characters passes.
    for key in ("root", "etc", "backup_dir", "run", "postgres_bin", "python", "supervisorctl"):
        value = getattr(config, key)
        if value and not re.fullmatch(r"[A-Za-z0-9._+/-]+", value):
            raise DeployError(
                f"{where}: {key} {value!r} has a character other than letters, digits and . _ - + /; use a plain path."
            )
    for host in config.hosts:
        if not _HOST.fullmatch(host):
            raise DeployError(f"{where}: host {host!r} is not user@host[:port].")
    minimums = {
        "web_workers": 1,
        "worker_concurrency": 1,
        "workers": 1,
        "web_graceful_timeout": 1,
        "task_time_limit": 1,
        "keep_releases": 2,
        "backup_keep": 1,
        "lock_expiry_seconds": 60,
        "health_timeout": 5,
        "login_rate_per_minute": 0,
        "write_rate_per_minute": 0,
    }
    for key, minimum in minimums.items():
        if getattr(config, key) < minimum:
            raise DeployError(f"{where}: {key} must be at least {minimum}, got {getattr(config, key)}.")
    if config.postgres_bin and not config.postgres_bin.startswith("/"):
        raise DeployError(
            f"{where}: postgres_bin must be an absolute directory (or empty: the PATH's), got {config.postgres_bin!r}."
        )
    if len(set(config.web_ports)) != len(config.web_ports):
        raise DeployError(f"{where}: web_ports must be distinct, got {list(config.web_ports)}.")
    if config.workers > 16:
        raise DeployError(f"{where}: workers must be at most 16 (raise worker_concurrency instead).")
    validate_trusted_proxies(config, where)
    validate_tls(config, where)
    validate_roles(config, where)
    validate_archive(config, where)
    validate_notify(config, where)


def trusted_proxy_networks(config: DeployConfig) -> list[str]:
    """trusted_proxies as the networks nginx's set_real_ip_from takes (checked by validate_trusted_proxies)."""
    return [str(ipaddress.ip_network(network, strict=False)) for network in config.trusted_proxies]


def validate_trusted_proxies(config: DeployConfig, where: str) -> None:
    """Each trusted proxy is an IPv4 or IPv6 address or network, not every address (then any client could choose
    the address its requests are counted under)."""
    for network in config.trusted_proxies:
        try:
            parsed = ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise DeployError(
                f"{where}: trusted_proxies has {network!r}, which is not an address or a network such as "
                '"10.0.0.0/8" or "2001:db8::/32".'
            ) from None
        if parsed.prefixlen == 0:
            raise DeployError(
                f"{where}: trusted_proxies has {network!r}, every address: any client could then choose its own "
                "address for the rate limits and lockouts; list your load balancer's addresses only."
            )


_WEBHOOK = re.compile(r"https?://[A-Za-z0-9.-]+(?::\d{1,5})?(?:/[^\s]*)?")
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


def validate_notify(config: DeployConfig, where: str) -> None:
    """Each notify target is an http(s):// URL with a host name or address, or an email address; none twice."""
    for target in config.notify:
        if target.startswith(("http://", "https://")):
            if not _WEBHOOK.fullmatch(target):
                raise DeployError(
                    f"{where}: notify has a webhook URL that is not http(s)://HOST[:PORT]/PATH (no spaces): "
                    f"{_shown(target)}."
                )
        elif not _EMAIL.fullmatch(target):
            raise DeployError(
                f"{where}: notify target {target!r} is neither a webhook URL (https://...) nor an email address "
                "(name@example.org)."
            )
    if len(set(config.notify)) != len(config.notify):
        raise DeployError(f"{where}: notify names a target twice.")


def _shown(url: str) -> str:
    """A URL without its path and query (where webhook services keep the token)."""
    head, _, rest = url.partition("://")
    return repr(f"{head}://{rest.split('/', 1)[0]}/...")


def validate_tls(config: DeployConfig, where: str) -> None:
    """`domain` is a DNS name a public CA can certify; the acme_* settings come with it and make sense."""
    domain = config.domain
    if not domain:
        stray = [key for key in ("aliases", "acme_email", "acme_ca_bundle") if getattr(config, key)]
        if stray or config.acme_directory != LETSENCRYPT:
            stray = stray or ["acme_directory"]
            raise DeployError(f"{where}: {', '.join(stray)} set without domain; set domain (the site's name) too.")
        return
    if not is_dns_name(domain):
        raise DeployError(
            f"{where}: domain {domain!r} is not a DNS name such as prayer.example.org (certificates need a name, "
            "not an address)."
        )
    seen = {domain.lower()}
    for alias in config.aliases:
        if not is_dns_name(alias):
            raise DeployError(
                f"{where}: alias {alias!r} is not a host name such as www.{domain} (a DNS name, no scheme, port, "
                "path or wildcard)."
            )
        if alias.lower() == domain.lower():
            raise DeployError(f"{where}: alias {alias!r} is the domain itself; list only the other names.")
        if alias.lower() in seen:
            raise DeployError(f"{where}: alias {alias!r} is listed twice; list each name once.")
        seen.add(alias.lower())
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", config.acme_email):
        raise DeployError(
            f"{where}: domain needs acme_email (where the CA sends expiry warnings), e.g. acme_email = "
            f'"admin@{domain}"; got {config.acme_email!r}.'
        )
    if not re.fullmatch(r"https://[^\s]+", config.acme_directory):
        raise DeployError(f"{where}: acme_directory must be an https:// URL, got {config.acme_directory!r}.")
    if config.acme_ca_bundle:
        _check_pem_bundle(Path(config.acme_ca_bundle), "acme_ca_bundle", where)


def is_dns_name(name: str) -> bool:
    """A name a public CA can certify: two labels or more of letters, digits and inner hyphens, not all-numeric."""
    labels = name.split(".")
    return (
        len(labels) >= 2
        and all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels)
        and not labels[-1].isdigit()
    )


def _check_pem_bundle(bundle: Path, key: str, where: str) -> None:
    try:
        text = bundle.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DeployError(f"{where}: {key} {bundle} cannot be read ({exc}).") from exc
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise DeployError(f"{where}: {key} {bundle} holds no PEM certificate.")


# --- Continuous archiving (issue 20): deploy.toml's backup_repository and backup_s3_* / backup_*_schedule/_keep.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REPOSITORY = re.compile(r"s3://([^/]*)(/[A-Za-z0-9._/-]*)?")
_ENDPOINT = re.compile(r"(?:https://)?([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)(?::(\d{1,5}))?/?")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]*")
# A systemd calendar expression (OnCalendar=): `systemd-analyze calendar` says what it means.
_CALENDAR = re.compile(r"[A-Za-z0-9*:,./~ +-]+")
_ARCHIVE_DEFAULTS = {f.name: f.default for f in fields(DeployConfig) if f.name.startswith("backup_s3_")}


@dataclass(frozen=True)
class ArchiveRepository:
    """Where pgBackRest keeps the archive: the bucket, the path in it, the S3 endpoint's host and port."""

    bucket: str
    path: str
    endpoint: str
    port: int
    region: str
    uri_style: str
    ca_bundle: str


def archive_repository(config: DeployConfig) -> ArchiveRepository | None:
    """The config's archive repository (checked by validate_archive), or None when archiving is off."""
    if not config.backup_repository:
        return None
    match = _REPOSITORY.fullmatch(config.backup_repository)
    endpoint = _ENDPOINT.fullmatch(config.backup_s3_endpoint or f"s3.{config.backup_s3_region}.amazonaws.com")
    assert match and endpoint, "validate_archive checks both"
    return ArchiveRepository(
        bucket=match.group(1),
        path="/" + (match.group(2) or "").strip("/"),
        endpoint=endpoint.group(1),
        port=int(endpoint.group(2) or 443),
        region=config.backup_s3_region,
        uri_style=config.backup_s3_uri_style,
        ca_bundle=config.backup_s3_ca_bundle,
    )


def validate_archive(config: DeployConfig, where: str) -> None:
    """backup_repository is s3://BUCKET/PREFIX, the backup_s3_* settings come with it and make sense, the schedules
    are systemd calendar expressions and the retention counts at least 1."""
    if not config.backup_repository:
        stray = [key for key, default in _ARCHIVE_DEFAULTS.items() if getattr(config, key) != default]
        if stray:
            raise DeployError(
                f"{where}: {', '.join(stray)} set without backup_repository; set backup_repository = "
                '"s3://BUCKET/PREFIX" too (or leave them out).'
            )
    else:
        match = _REPOSITORY.fullmatch(config.backup_repository)
        if not match or not _BUCKET.fullmatch(match.group(1)) or ".." in (match.group(2) or "").split("/"):
            raise DeployError(
                f'{where}: backup_repository must be "s3://BUCKET/PREFIX" (a bucket name of 3 to 63 lower-case '
                f"letters, digits, dots and hyphens, then a path), got {config.backup_repository!r}."
            )
        endpoint = config.backup_s3_endpoint
        if endpoint.startswith("http://"):
            raise DeployError(
                f"{where}: backup_s3_endpoint must use HTTPS (pgBackRest speaks nothing else): {endpoint!r}."
            )
        parsed = _ENDPOINT.fullmatch(endpoint) if endpoint else None
        if endpoint and (not parsed or not 0 < int(parsed.group(2) or 443) < 65536):
            raise DeployError(
                f"{where}: backup_s3_endpoint must be a host name with an optional port, e.g. "
                f'"s3.eu-central-003.backblazeb2.com" or "minio.example.org:9000", got {endpoint!r}.'
            )
        if not _REGION.fullmatch(config.backup_s3_region):
            raise DeployError(f"{where}: backup_s3_region must be a region name such as us-east-1, got "
                              f"{config.backup_s3_region!r}.")  # fmt: skip
        if config.backup_s3_uri_style not in ("host", "path"):
            raise DeployError(
                f'{where}: backup_s3_uri_style must be "host" (BUCKET.endpoint) or "path" (endpoint/BUCKET), got '
                f"{config.backup_s3_uri_style!r}."
            )
        if config.backup_s3_ca_bundle:
            _check_pem_bundle(Path(config.backup_s3_ca_bundle), "backup_s3_ca_bundle", where)
    for key in ("backup_full_schedule", "backup_diff_schedule", "backup_verify_schedule"):
        value = getattr(config, key)
        if not _CALENDAR.fullmatch(value):
            raise DeployError(
                f'{where}: {key} must be a systemd calendar expression such as "Sun *-*-* 01:30:00" or "daily", '
                f"got {value!r}."
            )
    for key in ("backup_full_keep", "backup_diff_keep"):
        if getattr(config, key) < 1:
            raise DeployError(f"{where}: {key} must be at least 1, got {getattr(config, key)}.")
