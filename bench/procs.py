"""Process trees from /proc: members, identities that survive pid reuse, CPU time, memory."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], utime [11], stime [12])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def started_at(pid: int) -> str | None:
    """The process's start time in clock ticks: with the pid, an identity that survives pid reuse."""
    fields = _stat(pid)
    return fields[19] if fields else None


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by the live processes of `root`'s tree."""
    total = 0
    for pid in process_tree(root):
        if fields := _stat(pid):
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def usage(pid: int) -> dict | None:
    """RSS and PSS in MB of one process, and its command line."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    kb = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.split()[-1] == "kB"}
    return {"pid": pid, "rss_mb": kb["Rss"] / 1024, "pss_mb": kb["Pss"] / 1024, "command": cmdline.strip()[:160]}
