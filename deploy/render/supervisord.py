"""Render supervisord.conf.j2: a pure function from a checked context to config text (no I/O but the template)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2

from deploy.app import LOCAL_SETTINGS_MODULE
from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.layout import SUPERVISOR_GROUP, WEB_PORTS
from deploy.render.jinja import REPO_DIR, render_template, supervisor_environment, template_environment
from deploy.render.programs_env import effective_environment, program_environment

TEMPLATE_DIR = REPO_DIR
TEMPLATE_NAME = "supervisord.conf.j2"
PROGRAM_KINDS = ("web", "worker", "beat")
MAX_WORKER_PROCESSES = 16
# The first file on supervisorctl's search path that exists wins, before Debian's own
# /etc/supervisor/supervisord.conf: it names our socket, so a plain `supervisorctl status` as root works.
SUPERVISORCTL_DEFAULT = PurePosixPath("/etc/supervisord.conf")

_PROGRAM_KEYS = ("group", "directory", "python", "manage", "log_dir", "environment", "processes", "web_ports")
_DAEMON_KEYS = ("socket", "pidfile", "logfile")


def check_context(context: Mapping[str, Any]) -> None:
    """Refuse a context the template cannot turn into a safe config, naming what to fix."""
    processes = context.get("processes") or {}
    daemon = context.get("supervisord")
    if not processes and not daemon:
        raise DeployError("nothing to render: the context has neither processes nor a supervisord section.")
    if daemon:
        _require(daemon, _DAEMON_KEYS, "supervisord.")
    if not processes:
        return
    _require(context, _PROGRAM_KEYS, "")
    unknown = sorted(set(processes) - set(PROGRAM_KINDS))
    if unknown:
        raise DeployError(f"unknown program(s) {', '.join(unknown)}; the template knows {', '.join(PROGRAM_KINDS)}.")
    for name, count in processes.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise DeployError(f"process count for {name} must be a whole number >= 0, got {count!r}.")
    if processes.get("beat", 0) not in (0, 1):
        raise DeployError(f"beat count must be 1 (two beats dispatch every task twice), got {processes['beat']}.")
    if processes.get("worker", 0) > MAX_WORKER_PROCESSES:
        raise DeployError(f"worker count {processes['worker']} is above {MAX_WORKER_PROCESSES}; raise concurrency.")
    ports = list(context["web_ports"])
    if processes.get("web", 0) != len(ports):
        raise DeployError(f"web count {processes.get('web', 0)} does not match the {len(ports)} web port(s) {ports}.")
    if len(set(ports)) != len(ports) or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
        raise DeployError(f"web ports must be distinct TCP ports, got {ports}.")
    for key in ("web_graceful_timeout", "task_time_limit"):
        value = context.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DeployError(f"{key} must be a positive number of seconds, got {value!r}.")
    supervisor_environment(context["environment"])  # refuse bad values before anything is uploaded


def _require(mapping: Mapping[str, Any], keys: tuple[str, ...], prefix: str) -> None:
    missing = [f"{prefix}{key}" for key in keys if mapping.get(key) in (None, "")]
    if missing:
        raise DeployError(f"supervisord context is missing {', '.join(missing)}.")


def program_list(context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The programs in start order, each with its name, kind and full environment."""
    processes = context.get("processes") or {}
    base = dict(context.get("environment") or {})
    if context.get("user"):
        base.update(USER=context["user"], LOGNAME=context["user"], HOME=context["home"])
    base["PYTHONUNBUFFERED"] = "1"
    programs = []
    for index, port in enumerate(context.get("web_ports") or (), start=1):
        if index > processes.get("web", 0):
            break
        env = {**base, "BIND_HOST": "127.0.0.1", "PORT": str(port)}
        env["WEB_GRACEFUL_TIMEOUT"] = str(context["web_graceful_timeout"])
        programs.append({"name": f"web-{index}", "kind": "web", "environment": env, "numprocs": 1})
    if processes.get("worker"):
        env = {**base, "CELERY_TASK_TIME_LIMIT": str(context["task_time_limit"])}
        programs.append({"name": "worker", "kind": "worker", "environment": env, "numprocs": processes["worker"]})
    if processes.get("beat"):
        programs.append({"name": "beat", "kind": "beat", "environment": base, "numprocs": 1})
    return programs


def render_supervisord_conf(context: Mapping[str, Any], template_dir: Path = TEMPLATE_DIR) -> str:
    """Render supervisord.conf.j2 for `context`; raises DeployError for a context it must not render."""
    check_context(context)
    template = template_environment(template_dir).get_template(TEMPLATE_NAME)
    try:
        return template.render(
            supervisord=context.get("supervisord"),
            programs=program_list(context),
            group=context.get("group", SUPERVISOR_GROUP),
            directory=context.get("directory", ""),
            python=context.get("python", ""),
            manage=context.get("manage", ""),
            log_dir=context.get("log_dir", ""),
            user=context.get("user"),
            web_graceful_timeout=context.get("web_graceful_timeout", 0),
            task_time_limit=context.get("task_time_limit", 0),
            log_stream=context.get("log_stream"),
        )
    except jinja2.UndefinedError as exc:
        raise DeployError(f"supervisord.conf.j2 needs a value the context does not give: {exc}") from exc


def local_context(
    repo_dir: Path,
    var_dir: Path,
    python: str | Path,
    *,
    port: int = 8000,
    environment: Mapping[str, str] | None = None,
    task_time_limit: int = 300,
    web_graceful_timeout: int = 20,
    stream_output: bool = False,
    color: bool = False,
    daemon_user: str | None = None,
    password: str | None = None,
) -> dict[str, Any]:
    """A standalone config for `supervisord -n -c VAR/supervisord.conf` on a checkout (VAR/run, VAR/log must exist).

    `stream_output` adds deploy/logstream.py as an event listener (every program's output and state changes
    on supervisord's stdout, prefixed with its name; `color` for a terminal) and keeps supervisord's own log
    off stdout (two writers that do not both append overwrite each other's lines in a file); `daemon_user`
    is the user supervisord already runs as, `password` guards its socket (both keep CRIT warnings away).
    """
    repo_dir, var_dir = Path(repo_dir).resolve(), Path(var_dir).resolve()
    env = {"DJANGO_SETTINGS_MODULE": LOCAL_SETTINGS_MODULE, **(environment or {})}
    return {
        "group": SUPERVISOR_GROUP,
        "directory": str(repo_dir / "project"),
        "python": str(python),
        "manage": str(repo_dir / "project" / "manage.py"),
        "log_dir": str(var_dir / "log"),
        "user": None,
        "home": None,
        "environment": env,
        "processes": {"web": 1, "worker": 1, "beat": 1},
        "web_ports": (port,),
        "web_graceful_timeout": web_graceful_timeout,
        "task_time_limit": task_time_limit,
        "supervisord": {
            "socket": str(var_dir / "run" / "supervisor.sock"),
            "pidfile": str(var_dir / "run" / "supervisord.pid"),
            "logfile": str(var_dir / "log" / "supervisord.log"),
            "socket_owner": None,
            "include": (),
            "user": daemon_user,
            "silent": stream_output,
            "username": "dev" if password else None,
            "password": password,
        },
        "log_stream": {
            "name": "output",
            "command": [python, repo_dir / "deploy" / "logstream.py", *(["--color"] if color else [])],
        }
        if stream_output
        else None,
    }


def server_context(
    config: DeployConfig, env_values: Mapping[str, str], *, home: str = "", web_ports: tuple[int, ...] = WEB_PORTS
) -> dict[str, Any]:
    """The programs of one server (a DeployConfig: on a cluster, its roles'), running `current`'s code; their
    environment is the effective env file's (deploy.render.programs_env), so an env change leaves this text alone."""
    layout = config.layout
    web_ports = tuple(web_ports) if config.runs("web") else ()
    environment = program_environment(config, effective_environment(config, env_values))
    return {
        "group": SUPERVISOR_GROUP,
        "directory": str(layout.current / "project"),
        "python": str(layout.current / ".venv" / "bin" / "python"),
        "manage": str(layout.current / "project" / "manage.py"),
        "log_dir": str(layout.logs),
        "user": config.user,
        "home": home or str(layout.root),
        "environment": environment,
        "processes": {
            "web": len(web_ports),
            "worker": config.workers if config.runs("worker") else 0,
            "beat": 1 if config.runs("beat") else 0,
        },
        "web_ports": tuple(web_ports),
        "web_graceful_timeout": config.web_graceful_timeout,
        "task_time_limit": config.task_time_limit,
        "supervisord": None,
    }


def render_supervisord_main(config: DeployConfig) -> str:
    """supervisord's root-owned main config on a server: a root-only socket, and the programs deploy renders."""
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


def render_supervisorctl_default(config: DeployConfig) -> str:
    """SUPERVISORCTL_DEFAULT: only the [supervisorctl] section, naming the app's socket."""
    return render_template(
        "supervisorctl.conf.j2", socket=str(config.layout.supervisor_socket), main=str(config.layout.supervisor_conf)
    )
