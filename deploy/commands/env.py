"""The env file's command lines: put a staged env file (and effective env file) in place, keeping the previous."""

from __future__ import annotations

from deploy.commands import sh
from deploy.layout import ServerLayout


def staged(path: object) -> str:
    """Where a file is uploaded before it is renamed over `path` (same directory: the rename is atomic)."""
    return f"{path}.new"


def replace_env_file(layout: ServerLayout, user: str, expected_sha256: str, *, effective: bool) -> str:
    """As root: refuse (exit 3, the staged files removed) unless the env file's sha256 is still `expected_sha256`;
    copy it to env.previous (root:<user> 0640, renamed into place), rename the staged env file over it, and with
    `effective` the staged effective env file over the live one."""
    env, previous = layout.env_file, layout.previous_env_file
    renames = [sh("mv", "-f", staged(env), env)]
    if effective:
        renames.append(sh("mv", "-f", staged(layout.effective_env), layout.effective_env))
    check = (
        f'[ "$(sha256sum < {sh(env)} | cut -d " " -f 1)" = {sh(expected_sha256)} ] || '
        f"{{ echo 'the env file changed meanwhile; run the command again.' >&2; "
        f"{sh('rm', '-f', staged(env), staged(layout.effective_env))}; exit 3; }}"
    )
    return " && ".join(
        [
            check,
            sh("install", "-o", "root", "-g", user, "-m", "0640", env, staged(previous)),
            sh("mv", "-f", staged(previous), previous),
            *renames,
        ]
    )
