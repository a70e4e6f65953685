"""The history log's commands: root appends one JSON line, root reads the last lines."""

from __future__ import annotations

from pathlib import PurePosixPath

from deploy.commands import sh


def append(path: PurePosixPath, line: str) -> str:
    """Append `line` to the log (created root:root 0600; its directory root's 0750 when missing)."""
    directory = path.parent
    return (
        f"{{ [ -d {sh(directory)} ] || install -d -m 750 {sh(directory)}; }} && "
        f"(umask 077 && printf '%s\\n' {sh(line)} >> {sh(path)})"
    )


def last(path: PurePosixPath, lines: int) -> str:
    """The log's last `lines` lines; nothing when there is no log yet."""
    return f"if [ -f {sh(path)} ]; then {sh('tail', '-n', lines, path)}; fi"
