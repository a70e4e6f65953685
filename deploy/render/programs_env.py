"""The programs' effective environment: the env file's values between the kit's defaults and what it derives, written
to one file that every program and `prayer-room-manage` read at start (the only place the values come from)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.render.jinja import render_template

# The variable naming the effective env file; the settings read the file at start (project/.../settings/base.py).
ENV_FILE_VARIABLE = "PRAYER_ROOM_ENV_FILE"
# Values that stay in each program's supervisord environment too: the settings module, and what deploy.toml's own
# keys set for the processes (a release's programs.conf keeps them, so a rollback brings them back with it). The
# file holds the same values; a program's own value wins over the file's.
PROGRAM_KEYS = (
    "DJANGO_SETTINGS_MODULE",
    "WEB_WORKERS",
    "WORKER_CONCURRENCY",
    "CELERY_TASK_TIME_LIMIT",
    "WEB_GRACEFUL_TIMEOUT",
    "STATIC_ROOT",
    "WORKER_QUEUES",
)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def effective_environment(config: DeployConfig, env_values: Mapping[str, str]) -> dict[str, str]:
    """What the programs run with: the kit's defaults, overridden by the env file, overridden by what it derives."""
    return {**dict(config.environment_defaults()), **env_values, **dict(config.environment_overrides())}


def program_environment(config: DeployConfig, effective: Mapping[str, str]) -> dict[str, str]:
    """The few values supervisord passes each program itself; the rest come from the effective env file."""
    kept = {key: effective[key] for key in PROGRAM_KEYS if key in effective}
    return {**kept, ENV_FILE_VARIABLE: str(config.layout.effective_env)}


def render_effective_env(values: Mapping[str, str]) -> str:
    """KEY='value' lines as django-environ's read_env reads them back exactly; refuses a value it would change."""
    lines = [
        "# Rendered by the deploy kit from the env file and deploy.toml: edit those (`fab env --set`), not this.\n"
    ]
    for key, raw in values.items():
        value = str(raw)
        if not _KEY.fullmatch(key):
            raise DeployError(f"environment variable name {key!r} is not valid; use letters, digits and _.")
        if "\n" in value or "\r" in value:
            raise DeployError(f"the value of {key} spans several lines; put it on one line.")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            raise DeployError(f"the value of {key} starts and ends with a double quote; remove them.")
        lines.append(f"{key}='{value}'\n")
    return "".join(lines)


def render_manage_script(config: DeployConfig, app_home: str) -> str:
    """/usr/local/sbin/prayer-room-manage: root's way to run manage.py as the programs do."""
    layout = config.layout
    return render_template(
        "prayer-room-manage.sh.j2",
        env_file=str(layout.effective_env),
        project=str(layout.current / "project"),
        user=config.user,
        home=app_home,
        variable=ENV_FILE_VARIABLE,
    )
