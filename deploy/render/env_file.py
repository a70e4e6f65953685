"""The app's env file (shared/env, KEY=value lines): its default values, and a new or existing file merged with them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import quote

from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.on_server.common import read_env_file
from deploy.render.jinja import render_template
from deploy.render.site import POSTGRES_PORT, REDIS_PORT, site_names, url_host

DATABASE = "prayer_room"
# Debian's redis-server on loopback, for the app's ACL user with the password provision generates: the broker (and
# Celery's result backend) in database 0, Django's cache in 1.
REDIS = "127.0.0.1:6379"
OLD_BROKER_URL = f"redis://{REDIS}/0"  # what servers provisioned before the password have


def redis_urls(password: str, address: str = "127.0.0.1", user: str = "") -> dict[str, str]:
    """Every Redis URL the programs use, each logging in as the app's ACL `user` with the password."""
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    where = f"{url_host(address)}:{REDIS_PORT}"
    return {"CELERY_BROKER_URL": f"redis://{auth}{where}/0", "CACHE_URL": f"redis://{auth}{where}/1"}


def env_defaults(
    config: DeployConfig, host: str, *, secret_key: str, db_password: str, redis_password: str
) -> dict[str, str]:
    """The env file's values for a server without TLS (the health check reaches gunicorn as 127.0.0.1).

    PostgreSQL and Redis are the db host's (config.db_address: loopback on a site of one host); without a db host
    the URLs are left out (the operator's managed services).
    """
    role = config.user.replace("-", "_")
    db = config.db_address
    where = f"{url_host(db)}:{POSTGRES_PORT}"
    services = (
        {
            "DATABASE_URL": f"postgres://{role}:{quote(db_password, safe='')}@{where}/{DATABASE}",
            **redis_urls(redis_password, db, config.user),
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


def _env_line(key: str, value: str) -> str:
    """KEY=value as read_env_file reads it back: quoted when the value has outer spaces or quotes of its own."""
    plain = value == value.strip() and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"")
    return f"{key}={value}\n" if plain else f'{key}="{value}"\n'


def sync_env_file(existing: str | None, shared: Mapping[str, str], defaults: Mapping[str, str]) -> str:
    """An app host's env file: `merge_env_file`'s, with each of `shared` (the site's values, the primary's) set to
    its value (an older one's line replaced in place, every other line kept)."""
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
        return render_template("env.j2", values=defaults)
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


def _line_key(line: str) -> str | None:
    """The key a KEY=value line of the env file sets (None for a blank or # line)."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    stripped = stripped[len("export ") :].lstrip() if stripped.startswith("export ") else stripped
    return stripped.partition("=")[0].strip()


def edit_env_file(existing: str, sets: Mapping[str, str], unsets: Sequence[str]) -> str:
    """The env file with each of `sets` set (its line replaced in place, or added at the end) and each of `unsets`
    removed; every other line (comments included) kept as it is. Refuses a value it could not read back as given."""
    lines, done = [], set()
    for line in existing.splitlines(keepends=True):
        key = _line_key(line)
        if key in unsets or key in done:
            continue  # removed; or a later line for a key set above (the last line would win)
        if key in sets:
            line = _env_line(key, sets[key])
            done.add(key)
        lines.append(line)
    text = "".join(lines)
    added = [_env_line(key, value) for key, value in sets.items() if key not in done]
    if added:
        text += ("" if text.endswith("\n") or not text else "\n") + "".join(added)
    values = read_env_file(text)
    for key, value in sets.items():
        if values.get(key) != value:
            raise DeployError(f"the value of {key} cannot be written to the env file as given; remove its quotes.")
    return text
