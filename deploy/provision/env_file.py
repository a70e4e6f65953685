"""The site's env values and each app host's env file: the primary's file is the source of the values every app
host shares; what it lacks is generated once. Nothing in them is ever printed."""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence
from urllib.parse import urlsplit

from deploy.config import DeployConfig
from deploy.env_sources import refusal
from deploy.errors import DeployError
from deploy.on_server.common import read_env_file
from deploy.provision.host import sync_read_file
from deploy.render.cluster_tls import cluster_env_values
from deploy.render.env_file import OLD_BROKER_URL, env_defaults, sync_env_file
from deploy.render.site import LOOPBACK
from deploy.ssh import Server

# What every app host of a site has alike, copied from the primary's env file to the others.
SHARED_ENV_KEYS = ("SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")
# What a site without a db host needs in the primary's env file: its managed PostgreSQL and Redis.
SERVICE_ENV_KEYS = ("DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")
# Their form for managed services: TLS, the server's certificate and name checked against the provider's CA.
_REDIS_TLS = "ssl_cert_reqs=required&ssl_check_hostname=true&ssl_ca_certs=CA_FILE"
MANAGED_URL_FORMS = {
    "DATABASE_URL": "postgres://USER:PASSWORD@HOST:5432/NAME?sslmode=verify-full&sslrootcert=CA_FILE",
    "CELERY_BROKER_URL": f"rediss://:PASSWORD@HOST:6379/0?{_REDIS_TLS}",
    "CACHE_URL": f"rediss://:PASSWORD@HOST:6379/1?{_REDIS_TLS}",
}


def fresh_env_defaults(config: DeployConfig, host: str) -> dict[str, str]:
    """`env_defaults` with newly generated secrets."""
    return env_defaults(
        config,
        host,
        secret_key=secrets.token_urlsafe(50),
        db_password=secrets.token_urlsafe(24),
        redis_password=secrets.token_urlsafe(32),
    )


def shared_env_values(primary: Mapping[str, str] | None, defaults: Mapping[str, str]) -> dict[str, str]:
    """The values every app host of a site gets alike: the primary's env file's where it has them (the source of
    truth), else the freshly generated `defaults` (a first run; and for the broker URL of a server provisioned before
    Redis had a password, OLD_BROKER_URL, one with a password)."""
    primary = {
        key: value for key, value in (primary or {}).items() if (key, value) != ("CELERY_BROKER_URL", OLD_BROKER_URL)
    }
    return {key: primary.get(key) or defaults[key] for key in SHARED_ENV_KEYS if primary.get(key) or key in defaults}


def service_key_problems(config: DeployConfig, values: Mapping[str, str]) -> list[str]:
    """SERVICE_ENV_KEYS of the site's shared env values that would not reach its PostgreSQL and Redis: missing, or
    naming another host than the db host; without a db host (managed services), missing or still loopback. A site of
    one host holding db has nothing to share: whatever its env file names is its own (another server's is left
    alone)."""
    if config.db_address and not config.multi_host:
        return []
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
    env = "" if config.name == "default" else f" --env {config.name}"
    sets = " ".join(f"--set '{key}={MANAGED_URL_FORMS[key]}'" for key in wrong)
    return (
        f"the cluster {config.name} has no db host: put {', '.join(wrong)} for your PostgreSQL and Redis into "
        f"{where}, on TLS checked against their CA (CA_FILE: its certificate on each app host, readable by the app "
        f"user): fab env{env} {sets}; then run `fab provision` again."
    )


def env_change_hosts(
    config: DeployConfig, app_hosts: Sequence[str], with_layout: Collection[str], changed: Collection[str]
) -> list[str]:
    """The app hosts `fab env --set/--unset` of the `changed` keys writes: every one; or, while `fab provision` has
    not yet laid out some (without a db host it prepares only the primary until its env file names the service
    URLs), those it has, when every changed key is one provision copies from the primary's env file to the others.
    Otherwise refused, saying what to do."""
    missing = [host for host in app_hosts if host not in with_layout]
    if not missing:
        return list(app_hosts)
    root = config.layout.root
    if config.primary in missing:
        raise DeployError(f"the primary {config.primary} has no {root} yet: run `fab provision` first.")
    others = [key for key in changed if key not in SHARED_ENV_KEYS]
    if others:
        copied = [key for key in SHARED_ENV_KEYS if refusal(config, key) is None]  # those fab env may set here
        raise DeployError(
            f"{', '.join(missing)} not provisioned yet (no {root}): before `fab provision` has run through, `fab env` "
            f"changes only {', '.join(copied)} (provision copies them from the primary's env file), not "
            f"{', '.join(others)}."
        )
    return [host for host in app_hosts if host in with_layout]


def site_env_values(server: Server, name: str) -> dict[str, str]:
    """The env values every app host shares: the primary's (`server`, called `name`) env file's, generated where it
    has none, on a cluster with the db host's URLs on TLS (`cluster_env_values`). Only reads; refused when they would
    not reach the site's PostgreSQL and Redis."""
    config = server.config
    existing = server.read(config.layout.env_file, what="reading the primary's env file")
    values = cluster_env_values(
        config,
        shared_env_values(read_env_file(existing) if existing else {}, fresh_env_defaults(config, server.conn.host)),
    )
    wrong = service_key_problems(config, values)
    if wrong:
        raise DeployError(service_keys_refusal(config, name, wrong))
    return values


def ensure_env_file(server: Server, shared: Mapping[str, str]) -> bool:
    """The host's env file (root's, readable by the app user's group: 0640): the site's `shared` values, this host's
    missing defaults; every other line kept."""
    config = server.config
    existing = server.read(config.layout.env_file, what="reading the env file")
    text = sync_env_file(existing, shared, fresh_env_defaults(config, server.conn.host))
    return sync_read_file(server, config.layout.env_file, existing, text, owner=f"root:{config.user}", mode="0640")
