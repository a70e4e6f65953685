"""What `fab provision` puts on a server, rendered without one: env file, supervisord main config, systemd unit,
nginx site, the layout's directories, and the checks of the server's facts. Pure: context in, text out."""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit

from deploy.config import APP_ROLES, DeployConfig, address_of
from deploy.errors import DeployError
from deploy.onserver import read_env_file
from deploy.render.supervisord import render_supervisord_conf, shell_join, template_environment

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates" / "provision"
# Debian's and Ubuntu's supervisor package: root-owned and patched by apt. Its own system-wide
# supervisor.service is turned off; the app runs its own supervisord from UNIT with our config.
SUPERVISORD = "/usr/bin/supervisord"
UNIT = "prayer-room.service"
BACKUP_SERVICE = "prayer-room-backup.service"
BACKUP_TIMER = "prayer-room-backup.timer"
# The first file on supervisorctl's search path that exists wins, before Debian's own
# /etc/supervisor/supervisord.conf: it names our socket, so a plain `supervisorctl status` as root works.
SUPERVISORCTL_DEFAULT = PurePosixPath("/etc/supervisord.conf")
DATABASE = "prayer_room"
# Debian's redis-server on loopback, with the password provision generates (requirepass): the broker (and
# Celery's result backend) in database 0, Django's cache in 1.
REDIS = "127.0.0.1:6379"
OLD_BROKER_URL = f"redis://{REDIS}/0"  # what servers provisioned before the password have
REDIS_CONF = PurePosixPath("/etc/redis/redis.conf")
_REDIS_BLOCK = ("# --- fab provision (prayer-room): begin", "# --- fab provision (prayer-room): end")
# gunicorn's own timeout (WEB_TIMEOUT) is 30 s; nginx must wait at least that long for an answer.
PROXY_READ_TIMEOUT = 60
# A client that sends nothing for this long while uploading its headers or body is dropped.
CLIENT_TIMEOUT = 10
# certbot (webroot mode) writes its HTTP-01 answers under here; nginx serves them on port 80.
ACME_WEBROOT = PurePosixPath("/var/lib/prayer-room-acme")
# certbot --cert-name: the certificate's fixed directory under /etc/letsencrypt/live/, whatever the domain.
CERT_NAME = "prayer-room"
CERT_DIR = PurePosixPath("/etc/letsencrypt/live") / CERT_NAME
HSTS_SECONDS = 31536000
# systemd drop-in giving certbot.service (what certbot.timer starts) the ACME server's CA bundle.
CERTBOT_DROPIN = PurePosixPath("/etc/systemd/system/certbot.service.d/prayer-room-acme-ca.conf")
RENEWAL_CONF = PurePosixPath("/etc/letsencrypt/renewal") / f"{CERT_NAME}.conf"
# `fab status` warns when the certificate expires sooner (certbot renews 30 days before).
EXPIRY_WARNING_DAYS = 14
MIN_PYTHON = (3, 11)
# Seconds a client is told to wait during a maintenance window (the measured window is shorter).
MAINTENANCE_RETRY_AFTER = 30


# What every app host of a cluster has alike, copied from the primary's env file to the others.
SHARED_ENV_KEYS = ("SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")
# What a cluster without a db host needs in the primary's env file: its managed PostgreSQL and Redis.
SERVICE_ENV_KEYS = ("DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
POSTGRES_PORT = 5432
REDIS_PORT = 6379
_PG_HBA_BLOCK = ("# --- fab provision (prayer-room cluster): begin", "# --- fab provision (prayer-room cluster): end")
FIREWALL_TABLE = "prayer_room"
FIREWALL_UNIT = "prayer-room-firewall.service"
NFT = "/usr/sbin/nft"
# The balancer's passive health check: a web host failing this often within FAIL_TIMEOUT s is skipped that long.
BALANCER_MAX_FAILS = 2
BALANCER_FAIL_TIMEOUT = 10


def has_app(config: DeployConfig) -> bool:
    """Whether the host `config` is bound to runs the app (web, worker or beat): a db or balancer host alone has no
    app user, layout, env file or supervisord, and deploy skips it."""
    return bool(config.host_roles & set(APP_ROLES))


def cluster_site_names(config: DeployConfig) -> list[str]:
    """The names a cluster's site answers to: the domain, else the balancer's address, else the web hosts'."""
    if config.domain:
        return [config.domain]
    if config.role_hosts("balancer"):
        return [address_of(config.role_hosts("balancer")[0])]
    return list(dict.fromkeys(address_of(host) for host in config.role_hosts("web")))


def site_names(config: DeployConfig, host: str) -> list[str]:
    """The names the site answers to: the configured domain, then the address or name given with -H (a cluster's:
    `cluster_site_names`, the same on every host)."""
    if config.multi_host:
        return cluster_site_names(config)
    names = [name for name in (config.domain, host) if name]
    return list(dict.fromkeys(names))


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def redis_urls(password: str, address: str = "127.0.0.1") -> dict[str, str]:
    """Every Redis URL the programs use, each with the password."""
    auth = f":{quote(password, safe='')}@"
    where = f"{_url_host(address)}:{REDIS_PORT}"
    return {"CELERY_BROKER_URL": f"redis://{auth}{where}/0", "CACHE_URL": f"redis://{auth}{where}/1"}


def env_defaults(
    config: DeployConfig, host: str, *, secret_key: str, db_password: str, redis_password: str
) -> dict[str, str]:
    """The env file's values for a server without TLS (the health check reaches gunicorn as 127.0.0.1).

    On a cluster, PostgreSQL and Redis are the db host's (config.db_address); without a db host the URLs are left
    out (the operator's managed services: `missing_service_keys`).
    """
    role = config.user.replace("-", "_")
    db = config.db_address
    where = f"{_url_host(db)}:{POSTGRES_PORT}"
    services = (
        {
            "DATABASE_URL": f"postgres://{role}:{quote(db_password, safe='')}@{where}/{DATABASE}",
            **redis_urls(redis_password, db),
        }
        if db
        else {}
    )
    return {
        "DJANGO_SETTINGS_MODULE": config.settings_module,
        "SECRET_KEY": secret_key,
        "ALLOWED_HOSTS": ",".join([*site_names(config, host), "127.0.0.1", "localhost"]),
        **services,
        "SECURE_SSL_REDIRECT": "false",
        "SECURE_COOKIES": "false",
    }


def shared_env_values(primary: Mapping[str, str] | None, defaults: Mapping[str, str]) -> dict[str, str]:
    """The values every app host of a cluster gets alike: the primary's env file's where it has them (the source
    of truth), else the freshly generated `defaults` (a first run)."""
    primary = primary or {}
    return {key: primary.get(key) or defaults[key] for key in SHARED_ENV_KEYS if primary.get(key) or key in defaults}


def service_key_problems(config: DeployConfig, values: Mapping[str, str]) -> list[str]:
    """SERVICE_ENV_KEYS of a cluster's shared env values that would not reach its PostgreSQL and Redis: missing, or
    naming another host than the db host; without a db host (managed services), missing or still 127.0.0.1."""
    wrong = []
    for key in SERVICE_ENV_KEYS:
        host = urlsplit(values[key]).hostname if values.get(key) else None
        if host is None or (host != config.db_address if config.db_address else host in LOOPBACK):
            wrong.append(key)
    return wrong


def service_keys_refusal(config: DeployConfig, primary: str, wrong: list[str]) -> str:
    """Why provision stops before any host changes: which keys to put into which host's env file."""
    where = f"{primary}'s {config.layout.env_file} (the primary's: the other hosts get them from it)"
    if config.db_address:
        return (
            f"{', '.join(wrong)} in {where} name another host than the db host {config.db_address}: point them at "
            "it, or delete those lines to have provision generate new ones."
        )
    return (
        f"the cluster {config.name} has no db host: put {', '.join(wrong)} for your PostgreSQL and Redis into "
        f"{where}, e.g. DATABASE_URL=postgres://USER:PASSWORD@HOST:5432/NAME, CELERY_BROKER_URL="
        "redis://:PASSWORD@HOST:6379/0, CACHE_URL=redis://:PASSWORD@HOST:6379/1; then run provision again."
    )


def scram_matches(verifier: str, password: str) -> bool:
    """Whether PostgreSQL's stored SCRAM-SHA-256 verifier (pg_authid.rolpassword) is that of `password`: provision
    checks the db host's role against the env file's password without ever sending it to be compared."""
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(\S+)", verifier.strip())
    if not match:
        return False
    iterations, salt = int(match[1]), base64.b64decode(match[2])
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return hmac.compare_digest(base64.b64encode(stored_key).decode(), match[3]) and hmac.compare_digest(
        base64.b64encode(server_key).decode(), match[4]
    )


def _env_line(key: str, value: str) -> str:
    """KEY=value as read_env_file reads it back: quoted when the value has outer spaces or quotes of its own."""
    plain = value == value.strip() and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"")
    return f"{key}={value}\n" if plain else f'{key}="{value}"\n'


def sync_env_file(existing: str | None, shared: Mapping[str, str], defaults: Mapping[str, str]) -> str:
    """A cluster host's env file: `merge_env_file`'s, with each of `shared` set to its value (an older one's line
    replaced in place, every other line kept)."""
    text = merge_env_file(existing, {**defaults, **shared})
    lines = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        stripped = stripped[len("export ") :].lstrip() if stripped.startswith("export ") else stripped
        key = stripped.partition("=")[0].strip()
        if not stripped.startswith("#") and key in shared and read_env_file(line).get(key) != shared[key]:
            line = _env_line(key, shared[key])
        lines.append(line)
    return "".join(lines)


def merge_env_file(existing: str | None, defaults: Mapping[str, str]) -> str:
    """The env file text: `existing` untouched plus a line for each default it lacks (the whole file when new).

    One exception: the broker URL of a server provisioned before Redis had a password (OLD_BROKER_URL) is
    replaced by the default's, which has one.
    """
    if existing is None:
        return template_environment(TEMPLATE_DIR).get_template("env.j2").render(values=defaults)
    if read_env_file(existing).get("CELERY_BROKER_URL") == OLD_BROKER_URL and "CELERY_BROKER_URL" in defaults:
        existing = "".join(
            line
            for line in existing.splitlines(keepends=True)
            if not line.strip().startswith(("CELERY_BROKER_URL=", "export CELERY_BROKER_URL="))
        )
    present = read_env_file(existing)
    missing = [f"{key}={value}\n" for key, value in defaults.items() if key not in present]
    if not missing:
        return existing
    return existing + ("" if existing.endswith("\n") or not existing else "\n") + "".join(missing)


def render_nginx_site(
    config: DeployConfig,
    host: str,
    *,
    tls: bool = False,
    ipv6: bool = True,
    address: str = "",
    http_port: int = 80,
    https_port: int = 443,
) -> str:
    """The nginx site: config.web_ports behind one upstream, each release's static files, a 444 default server.

    With `tls` (a certificate for config.domain exists) port 80 only answers the ACME challenge and redirects;
    the site is on 443. `address`, the ports and `ipv6` are for tests, which listen on a loopback port.
    """
    return (
        _nginx_environment()
        .get_template("nginx-site.conf.j2")
        .render(
            upstream="prayer_room_web",
            balancer=balancer_address(config),
            web_ports=config.web_ports,
            server_names=[config.domain] if tls else site_names(config, host),
            root=str(config.layout.root),
            **maintenance_context(config),
            **_front_context(config, tls, ipv6, address, http_port, https_port),
        )
    )


def _front_context(
    config: DeployConfig, tls: bool, ipv6: bool, address: str, http_port: int, https_port: int
) -> dict[str, object]:
    """What a web host's site and the balancer's share: where they listen, the client limits, TLS."""
    return {
        "ipv6": ipv6,
        "address": address,
        "http_port": http_port,
        "https_port": https_port,
        "max_body": "1m",
        "client_timeout": CLIENT_TIMEOUT,
        "read_timeout": PROXY_READ_TIMEOUT,
        "tls": tls,
        "acme_webroot": str(ACME_WEBROOT) if config.domain else "",
        "certificate": str(CERT_DIR / "fullchain.pem"),
        "certificate_key": str(CERT_DIR / "privkey.pem"),
        "hsts_seconds": HSTS_SECONDS,
    }


def balancer_address(config: DeployConfig) -> str:
    """The cluster's balancer's address (the one source whose X-Forwarded-* headers the web hosts believe), or ""."""
    balancer = config.role_hosts("balancer")
    return address_of(balancer[0]) if balancer else ""


def render_balancer_site(
    config: DeployConfig,
    *,
    tls: bool = False,
    ipv6: bool = True,
    address: str = "",
    http_port: int = 80,
    https_port: int = 443,
    web_port: int = 80,
) -> str:
    """The balancer's nginx site: the web hosts' own nginx (port 80) as upstreams with passive health checks and a
    new connection per request, a 444 default server. With `domain` it answers the ACME challenge, and with `tls` (its
    certificate exists) it serves HTTPS and redirects HTTP. `address`, the ports and `ipv6` are for tests."""
    servers = [f"{_url_host(address_of(host))}:{web_port}" for host in config.role_hosts("web")]
    return (
        _nginx_environment()
        .get_template("nginx-balancer.conf.j2")
        .render(
            upstream="prayer_room_web_hosts",
            servers=servers,
            max_fails=BALANCER_MAX_FAILS,
            fail_timeout=BALANCER_FAIL_TIMEOUT,
            server_names=cluster_site_names(config),
            **_front_context(config, tls, ipv6, address, http_port, https_port),
        )
    )


def maintenance_context(config: DeployConfig) -> dict[str, object]:
    page = " ".join((TEMPLATE_DIR / "maintenance.html").read_text().split())
    flag = str(config.layout.maintenance_flag)
    return {"maintenance_flag": flag, "retry_after": MAINTENANCE_RETRY_AFTER, "page": page}


def _nginx_environment():
    env = template_environment(TEMPLATE_DIR)
    # Inside "...": backslash and quote escaped; `$` would start a variable and has no escape, so it is refused.
    env.filters["nginx_string"] = _nginx_string
    return env


def _nginx_string(text: str) -> str:
    if "$" in text:
        raise DeployError("an nginx string cannot hold '$' (it would be read as a variable).")
    return text.replace("\\", "\\\\").replace('"', '\\"')


def render_nginx_maintenance(config: DeployConfig) -> str:
    """The nginx server-block lines that answer 503 while the maintenance flag exists (the site includes them)."""
    return _nginx_environment().get_template("nginx-maintenance.conf.j2").render(**maintenance_context(config))


def acme_ca_path(config: DeployConfig) -> PurePosixPath:
    """Where provision puts acme_ca_bundle on the server (root-owned, world-readable: it is a public CA)."""
    return config.layout.etc / "acme-ca.pem"


def render_certbot_dropin(config: DeployConfig) -> str:
    return (
        template_environment(TEMPLATE_DIR)
        .get_template("certbot-ca.conf.j2")
        .render(directory=config.acme_directory, bundle=str(acme_ca_path(config)))
    )


def certbot_command(config: DeployConfig, *, replace: bool) -> str:
    """certbot certonly in webroot mode (nginx keeps running) for config.domain, saved for certbot.timer's
    renewals with the same server and the deploy hook that reloads nginx; `replace` re-issues at once."""
    words = [
        "certbot", "certonly", "--non-interactive", "--agree-tos", "--email", config.acme_email,
        "--server", config.acme_directory, "--webroot", "--webroot-path", ACME_WEBROOT,
        "--cert-name", CERT_NAME, "--domains", config.domain, "--deploy-hook", "systemctl reload nginx",
    ]  # fmt: skip
    words += ["--force-renewal"] if replace else ["--keep-until-expiring"]
    command = shell_join(words)
    if config.acme_ca_bundle:
        command = f"REQUESTS_CA_BUNDLE={shell_join([acme_ca_path(config)])} {command}"
    return command


CERTIFICATE_SCRIPT = f"""\
if [ -f {CERT_DIR}/fullchain.pem ]; then
    openssl x509 -in {CERT_DIR}/fullchain.pem -noout -enddate -ext subjectAltName
    sed -n 's/^server *= */server=/p' {RENEWAL_CONF}
fi
"""


def parse_certificate(text: str) -> dict[str, object] | None:
    """CERTIFICATE_SCRIPT's output: the names, expiry (epoch seconds) and ACME server; None without a certificate."""
    expiry = re.search(r"^notAfter=(.+)$", text, re.M)
    if not expiry:
        return None
    server = re.search(r"^server=(\S+)", text, re.M)
    return {
        "names": re.findall(r"DNS:([^,\s]+)", text),
        "expires": calendar.timegm(time.strptime(expiry.group(1).strip(), "%b %d %H:%M:%S %Y %Z")),
        "server": server.group(1) if server else "",
    }


def certificate_fits(config: DeployConfig, certificate: Mapping[str, object] | None, now: float) -> bool:
    """A certificate nginx can serve for config.domain: it names the domain, is unexpired, and from acme_directory."""
    return bool(
        certificate
        and config.domain in certificate["names"]
        and certificate["expires"] > now
        and certificate["server"] == config.acme_directory
    )


def certificate_line(config: DeployConfig, certificate: Mapping[str, object] | None, now: float) -> str:
    """`fab status`'s line: the days left, a WARNING under EXPIRY_WARNING_DAYS (renewal is not working)."""
    if certificate is None:
        return f"certificate: none for {config.domain}; run `fab provision`"
    days = int((certificate["expires"] - now) // 86400)
    names = ", ".join(certificate["names"])
    date = time.strftime("%Y-%m-%d", time.gmtime(certificate["expires"]))
    line = f"certificate: {names}, expires in {days} days ({date})"
    if days < EXPIRY_WARNING_DAYS:
        line += (
            f"  WARNING: under {EXPIRY_WARNING_DAYS} days; certbot.timer should have renewed it 30 days before: "
            "see `journalctl -u certbot` on the server"
        )
    return line


def render_unit(config: DeployConfig) -> str:
    """The systemd unit that keeps the app's supervisord (and so web, worker, beat) up across reboots, sandboxed.

    supervisord runs as root only to open the logs and setuid to the app user; the programs inherit the
    sandbox: the whole file system read-only but the log directory, no capabilities once they are the app user.
    """
    layout = config.layout
    run = PurePosixPath(layout.run)
    runtime = str(run.relative_to("/run")) if run.parent == PurePosixPath("/run") else None
    return (
        template_environment(TEMPLATE_DIR)
        .get_template("app.service.j2")
        .render(
            supervisord=SUPERVISORD,
            supervisor_conf=str(layout.supervisor_conf),
            runtime_directory=runtime,
            writable=[str(layout.logs)] + ([] if runtime else [str(run)]),
            # The worker may take task_time_limit + 30 s to stop (its stopwaitsecs): wait a little longer.
            stop_timeout=config.task_time_limit + 60,
        )
    )


def backup_helper(config: DeployConfig) -> PurePosixPath:
    """The copy of deploy/onserver.py the backup timer runs (root-owned; a deploy never touches it)."""
    return config.layout.etc / "onserver.py"


def render_backup_units(config: DeployConfig) -> tuple[str, str]:
    """The daily backup's oneshot service and its timer; the newest backup_keep daily backups are kept."""
    layout = config.layout
    env = template_environment(TEMPLATE_DIR)
    service = env.get_template("backup.service.j2").render(
        python=config.python,
        helper=str(backup_helper(config)),
        env_file=str(layout.env_file),
        backup_dir=str(layout.backups),
        current=str(layout.current),
        keep=config.backup_keep,
        pg_bin=["--pg-bin", config.postgres_bin] if config.postgres_bin else [],
    )
    return service, env.get_template("backup.timer.j2").render()


def render_supervisord_main(config: DeployConfig) -> str:
    """supervisord's root-owned main config: a root-only socket, and the programs deploy renders."""
    layout = config.layout
    return render_supervisord_conf(
        {
            "processes": {},
            "log_dir": str(layout.logs),
            "supervisord": {
                "socket": str(layout.supervisor_socket),
                "socket_owner": None,
                "pidfile": str(layout.run / "supervisord.pid"),
                "logfile": str(layout.logs / "supervisord.log"),
                "include": (str(layout.programs_conf),),
            },
        }
    )


def redis_password(values: Mapping[str, str], address: str = "127.0.0.1") -> str | None:
    """The password of the Redis at `address` (this host's: loopback, or a cluster's db address) the env file's
    broker URL names; None for another Redis (left alone)."""
    url = urlsplit(values.get("CELERY_BROKER_URL", ""))
    if url.scheme != "redis" or url.netloc.rpartition("@")[2] != f"{_url_host(address)}:{REDIS_PORT}":
        return None
    return unquote(url.password) if url.password else None


def _without_block(text: str, marks: tuple[str, str]) -> str:
    lines, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == marks[0]:
            inside = True
        elif line.strip() == marks[1]:
            inside = False
        elif not inside:
            lines.append(line)
    return "".join(lines).rstrip("\n")


def redis_conf_with_password(text: str, password: str, bind: tuple[str, ...] = ()) -> str:
    """Debian's redis.conf with provision's block at its end (no later line overrides it), replacing an older one:
    requirepass, CONFIG renamed away (with the password, CONFIG SET could still make Redis write files), and on a
    cluster's db host `bind` (loopback and its address)."""
    block = (
        template_environment(TEMPLATE_DIR)
        .get_template("redis.conf.j2")
        .render(password=password, marks=_REDIS_BLOCK, bind=bind)
    )
    return _without_block(text, _REDIS_BLOCK) + "\n\n" + block


def redis_bind(config: DeployConfig) -> tuple[str, ...]:
    """What the db host's Redis listens on: loopback (IPv6's if there is one: `-`) and the cluster's db address."""
    return ("127.0.0.1", "-::1", config.db_address)


def render_postgres_listen(config: DeployConfig) -> str:
    """The conf.d drop-in making the db host's PostgreSQL listen on localhost and the db address."""
    return (
        template_environment(TEMPLATE_DIR)
        .get_template("postgresql-listen.conf.j2")
        .render(addresses=["localhost", config.db_address])
    )


def _host_network(address: str) -> str:
    return f"{address}/128" if ":" in address else f"{address}/32"


def pg_hba_with_peers(text: str, config: DeployConfig, role: str, database: str) -> str:
    """Debian's pg_hba.conf with provision's block at its end, replacing an older one: `role` may reach
    `database` from each cluster peer address, scram-sha-256 only (Debian's own lines come first and match
    nothing but loopback and the local socket)."""
    block = (
        template_environment(TEMPLATE_DIR)
        .get_template("pg_hba.conf.j2")
        .render(
            marks=_PG_HBA_BLOCK,
            role=role,
            database=database,
            addresses=[_host_network(address) for address in config.peer_addresses],
        )
    )
    return _without_block(text, _PG_HBA_BLOCK) + "\n\n" + block


def firewall_rules_path(config: DeployConfig) -> PurePosixPath:
    return config.layout.etc / "firewall.nft"


def render_firewall(config: DeployConfig) -> str:
    """The db host's nftables table: PostgreSQL and Redis only from loopback and the cluster's hosts; nothing else
    filtered (SSH, nginx), no other table touched."""
    peers = config.peer_addresses
    return (
        template_environment(TEMPLATE_DIR)
        .get_template("firewall.nft.j2")
        .render(
            table=FIREWALL_TABLE,
            unit=FIREWALL_UNIT,
            ports=[POSTGRES_PORT, REDIS_PORT],
            ipv4=[address for address in peers if ":" not in address],
            ipv6=[address for address in peers if ":" in address],
        )
    )


def render_firewall_unit(config: DeployConfig) -> str:
    return (
        template_environment(TEMPLATE_DIR)
        .get_template("firewall.service.j2")
        .render(table=FIREWALL_TABLE, nft=NFT, rules=str(firewall_rules_path(config)))
    )


def render_after_network_dropin() -> str:
    """A systemd drop-in: the unit (PostgreSQL, Redis on the db address) starts once the network is up."""
    return template_environment(TEMPLATE_DIR).get_template("after-network.conf.j2").render()


def render_supervisorctl_default(config: DeployConfig) -> str:
    """SUPERVISORCTL_DEFAULT: only the [supervisorctl] section, naming the app's socket."""
    return (
        template_environment(TEMPLATE_DIR)
        .get_template("supervisorctl.conf.j2")
        .render(socket=str(config.layout.supervisor_socket), main=str(config.layout.supervisor_conf))
    )


def directories(config: DeployConfig) -> list[tuple[PurePosixPath, str, str]]:
    """(path, owner, mode) of every directory provision creates: all root's, read-only to the app user; nginx must
    traverse down to releases/<id>/static. The socket's directory is the unit's RuntimeDirectory."""
    layout = config.layout
    acme = [(ACME_WEBROOT, "root", "755")] if config.domain else []
    return [
        *acme,
        (layout.root, "root", "755"),
        (layout.releases, "root", "755"),
        (layout.venvs, "root", "755"),
        (layout.env_file.parent, "root", "755"),
        (layout.logs, "root", "750"),
        (layout.etc, "root", "755"),
    ]


def check_facts(facts: Mapping[str, str], where: str) -> None:
    """Refuse a server provision cannot handle, before anything changes, with what to do about it."""
    if facts.get("systemd") != "yes":
        raise DeployError(
            f"{where}: the server does not run systemd (PID 1 is {facts.get('init') or 'unknown'}), which provision "
            "needs to bring the site back after a reboot; use a Debian 12 or Ubuntu 24.04 server with systemd."
        )
    if facts.get("apt") != "yes":
        raise DeployError(
            f"{where}: no apt-get on {facts.get('os') or 'this system'}; provision supports Debian 12 and Ubuntu 24.04."
        )
    python = facts.get("python", "")
    if not re.fullmatch(r"\d+\.\d+", python) or tuple(map(int, python.split("."))) < MIN_PYTHON:
        found = f"python3 {python}" if python else "no python3"
        raise DeployError(
            f"{where}: {found}; the app needs python3 >= {'.'.join(map(str, MIN_PYTHON))} (Debian 12, Ubuntu 24.04)."
        )


def parse_facts(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


FACTS_SCRIPT = """\
if [ -d /run/systemd/system ]; then echo systemd=yes; else echo systemd=no; fi
echo "init=$(cat /proc/1/comm 2>/dev/null)"
if command -v apt-get >/dev/null 2>&1; then echo apt=yes; else echo apt=no; fi
echo "os=$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
echo "python=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
"""
