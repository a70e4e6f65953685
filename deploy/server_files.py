"""What `fab provision` reads or decides on a server: the server's facts and their checks, the values a site's app
hosts share, the layout's directories, and whether a role password is already set. Pure: no SSH here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from deploy.config import APP_ROLES, DeployConfig
from deploy.errors import DeployError
from deploy.render.nginx import ACME_WEBROOT
from deploy.render.site import REDIS_PORT, url_host

MIN_PYTHON = (3, 11)
# What every app host of a cluster has alike, copied from the primary's env file to the others.
SHARED_ENV_KEYS = ("SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")
# What a cluster without a db host needs in the primary's env file: its managed PostgreSQL and Redis.
SERVICE_ENV_KEYS = ("DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def has_app(config: DeployConfig) -> bool:
    """Whether the host `config` is bound to runs the app (web, worker or beat): a db or balancer host alone has no
    app user, layout, env file or supervisord, and deploy skips it."""
    return bool(config.host_roles & set(APP_ROLES))


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


def redis_password(values: Mapping[str, str], address: str = "127.0.0.1") -> str | None:
    """The password of the Redis at `address` (this host's: loopback, or a cluster's db address) the env file's
    broker URL names; None for another Redis (left alone)."""
    url = urlsplit(values.get("CELERY_BROKER_URL", ""))
    if url.scheme != "redis" or url.netloc.rpartition("@")[2] != f"{url_host(address)}:{REDIS_PORT}":
        return None
    return unquote(url.password) if url.password else None


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
