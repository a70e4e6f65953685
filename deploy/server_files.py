"""What `fab provision` puts on a server, rendered without one: env file, supervisord main config, systemd unit,
nginx site, the layout's directories, and the checks of the server's facts. Pure: context in, text out."""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit

from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.onserver import read_env_file
from deploy.render import render_supervisord_conf, shell_join, template_environment

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


def site_names(config: DeployConfig, host: str) -> list[str]:
    """The names the site answers to: the configured domain, then the address or name given with -H."""
    names = [name for name in (config.domain, host) if name]
    return list(dict.fromkeys(names))


def redis_urls(password: str) -> dict[str, str]:
    """Every Redis URL the programs use, each with the password."""
    auth = f":{quote(password, safe='')}@"
    return {"CELERY_BROKER_URL": f"redis://{auth}{REDIS}/0", "CACHE_URL": f"redis://{auth}{REDIS}/1"}


def env_defaults(
    config: DeployConfig, host: str, *, secret_key: str, db_password: str, redis_password: str
) -> dict[str, str]:
    """The env file's values for a server without TLS (the health check reaches gunicorn as 127.0.0.1)."""
    role = config.user.replace("-", "_")
    return {
        "DJANGO_SETTINGS_MODULE": config.settings_module,
        "SECRET_KEY": secret_key,
        "ALLOWED_HOSTS": ",".join([*site_names(config, host), "127.0.0.1", "localhost"]),
        "DATABASE_URL": f"postgres://{role}:{quote(db_password, safe='')}@127.0.0.1:5432/{DATABASE}",
        **redis_urls(redis_password),
        "SECURE_SSL_REDIRECT": "false",
        "SECURE_COOKIES": "false",
    }


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
            web_ports=config.web_ports,
            ipv6=ipv6,
            address=address,
            http_port=http_port,
            https_port=https_port,
            server_names=[config.domain] if tls else site_names(config, host),
            max_body="1m",
            client_timeout=CLIENT_TIMEOUT,
            root=str(config.layout.root),
            read_timeout=PROXY_READ_TIMEOUT,
            **maintenance_context(config),
            tls=tls,
            acme_webroot=str(ACME_WEBROOT) if config.domain else "",
            certificate=str(CERT_DIR / "fullchain.pem"),
            certificate_key=str(CERT_DIR / "privkey.pem"),
            hsts_seconds=HSTS_SECONDS,
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


def redis_password(values: Mapping[str, str]) -> str | None:
    """The password of the local Redis the env file's broker URL names; None for another Redis (left alone)."""
    url = urlsplit(values.get("CELERY_BROKER_URL", ""))
    if url.scheme != "redis" or url.netloc.rpartition("@")[2] != REDIS or not url.password:
        return None
    return unquote(url.password)


def redis_conf_with_password(text: str, password: str) -> str:
    """Debian's redis.conf with provision's block at its end (no later line overrides it), replacing an older one:
    requirepass, and CONFIG renamed away (with the password, CONFIG SET could still make Redis write files)."""
    lines, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == _REDIS_BLOCK[0]:
            inside = True
        elif line.strip() == _REDIS_BLOCK[1]:
            inside = False
        elif not inside:
            lines.append(line)
    block = (
        template_environment(TEMPLATE_DIR).get_template("redis.conf.j2").render(password=password, marks=_REDIS_BLOCK)
    )
    return "".join(lines).rstrip("\n") + "\n\n" + block


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
