"""Reading logs on a server."""

from __future__ import annotations

from deploy.commands import sh


def tail(paths: list, lines: object, follow: bool = False) -> str:
    """The last `lines` lines of each log; `follow` keeps streaming, across rotations (tail -F)."""
    return sh("tail", "-n", lines, *(("-F",) if follow else ()), *paths)


def since(path: object, offset: int) -> str:
    """A log from byte `offset` on; from its start when it was rotated (is now shorter than `offset`)."""
    return f'f={sh(path)}; o={offset + 1}; [ $(stat -c %s "$f") -lt {offset} ] && o=1; tail -c +$o "$f"'
