"""The programs' effective environment on a host: installed at each deploy and env change, read by every program
and by `prayer-room-manage` (root's manage.py), the one command `fab manage` and `fab shell` run."""

from __future__ import annotations

import hashlib
import shlex
import sys
from typing import TYPE_CHECKING

from deploy import terminal
from deploy.commands import env as env_commands
from deploy.errors import DeployError
from deploy.on_server.common import read_env_file
from deploy.render.programs_env import effective_environment, render_effective_env, render_manage_script

if TYPE_CHECKING:
    from deploy.layout import ServerLayout
    from deploy.ssh import Server


def program_files(server: Server) -> tuple[list[tuple[str, object, str, str]], str]:
    """The files a deploy installs beside its release: the effective env file (root:<app user> 0640, from the env
    file on the host and this config; staged, then renamed over the live one) and prayer-room-manage; with the
    root command that puts the staged file in place."""
    layout, user = server.config.layout, server.config.user
    env_text = server.read(layout.env_file, what="reading the env file")
    if env_text is None:
        raise DeployError(f"{server.name} has no env file at {layout.env_file}; run `fab provision`.")
    try:
        values = read_env_file(env_text)
    except ValueError as exc:
        raise DeployError(f"{layout.env_file} on {server.name}: {exc}.") from exc
    staged = f"{layout.effective_env}.new"
    files = [
        (render_effective_env(effective_environment(server.config, values)), staged, f"root:{user}", "0640"),
        (render_manage_script(server.config, server.app_home), layout.manage_command, "root", "0755"),
    ]
    return files, f"mv -f {shlex.quote(staged)} {shlex.quote(str(layout.effective_env))}"


def manage_argv(layout: ServerLayout, args: str) -> list[str]:
    """prayer-room-manage with `args` split as a shell splits words; a line it cannot split is refused."""
    try:
        words = shlex.split(args)
    except ValueError as exc:
        message = f'cannot split {args!r} into words ({exc}); quote it as a shell would: fab manage "ARGS".'
        raise DeployError(message) from None
    if not words:
        raise DeployError('name the command: fab manage "COMMAND [ARGS]", e.g. fab manage "createsuperuser".')
    return [str(layout.manage_command), *words]


def run_manage(server: Server, argv: list[str]) -> int:
    """Run prayer-room-manage on `server`: with a terminal interactively (a remote pty, the local terminal raw:
    what is typed and Ctrl-C reach the command), without one with stdin and stdout passed through; returns its exit
    code."""
    command = (
        f"test -x {shlex.quote(argv[0])} || {{ echo 'no {argv[0]} on this host yet: run `fab deploy`.' >&2; exit 3; }}"
        f" && exec {shlex.join(argv)}"
    )
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        result = server.root(command, what="manage.py", warn=True, hide=False, in_stream=terminal.stdin_input())
        return result.exited
    with terminal.remote_terminal() as typed:
        result = server.root(command, what="manage.py", warn=True, hide=False, pty=True, in_stream=typed)
    return result.exited


def effective_text(server: Server, env_text: str) -> str:
    """The effective env file for an env file's text; refused (a bad line or value) before anything changes."""
    try:
        values = read_env_file(env_text)
    except ValueError as exc:
        raise DeployError(f"{server.config.layout.env_file} on {server.name}: {exc}.") from exc
    return render_effective_env(effective_environment(server.config, values))


def install_env(server: Server, expected: str, new_text: str, *, effective: bool) -> None:
    """Replace the env file with `new_text` atomically (staged beside it, renamed over it), the one it replaces kept
    as env.previous; with `effective`, the effective env file too. Refused, nothing changed, when the env file is no
    longer `expected` (edited meanwhile)."""
    layout, group = server.config.layout, f"root:{server.config.user}"
    files = [(new_text, env_commands.staged(layout.env_file), group, "0640")]
    if effective:
        files.append((effective_text(server, new_text), env_commands.staged(layout.effective_env), group, "0640"))
    digest = hashlib.sha256(expected.encode()).hexdigest()
    then = env_commands.replace_env_file(layout, server.config.user, digest, effective=effective)
    server.upload(files, then=then, what="replacing the env file")
