"""The on-server helpers' command lines: the app helper with a release's Python, the root helper with python3."""

from __future__ import annotations

from deploy.commands import sh
from deploy.commands.users import as_app, as_build
from deploy.config import DeployConfig
from deploy.on_server import script


def helper_argv(python: object, name: str, *args: object, env_file: object = None) -> list[str]:
    """The one command line of a helper: PYTHON -c <deploy/on_server/NAME.py as one script> [--env-file F] ARGS."""
    env = ("--env-file", str(env_file)) if env_file else ()
    return [str(python), "-c", script(name), *env, *(str(arg) for arg in args)]


def app_helper(config: DeployConfig, release_dir: object, *args: object, app_home: str, build: bool = False) -> str:
    """A root shell command: the app helper with ARGS, in `release_dir` with its virtualenv's Python, as the app user
    (or, with `build`, as the build user); the kit's environment defaults and overrides travel as --default/--set."""
    overlay = [f"--default={key}={value}" for key, value in config.environment_defaults()]
    overlay += [f"--set={key}={value}" for key, value in config.environment_overrides()]
    argv = helper_argv(".venv/bin/python", "app_helper", *overlay, *args, env_file=config.layout.env_file)
    command = f"cd {sh(release_dir)} && {sh(*argv)}"
    return as_build(command, config.build_user, config.user) if build else as_app(command, config.user, app_home)


def root_helper(config: DeployConfig, *args: object, env_file: bool = True) -> str:
    """A root shell command: the root helper with ARGS and the server's python3 (no virtualenv, no release code),
    reading the env file (DATABASE_URL) unless `env_file` is False."""
    return sh(*helper_argv(config.python, "root_helper", *args, env_file=config.layout.env_file if env_file else None))
