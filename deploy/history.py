"""What was done to a site, and by whom: every provision, deploy, rollback, restore, env change, maintenance
switch and os-update appends one JSON line to a root-owned log on the primary (layout.history), so a cluster has
one history.

The actions record through `recorded`, which notes the start, the result (the one-line error of a failure) and the
duration, even when the command fails, then announces it to deploy.toml's notify targets (deploy/notify.py). A
record is a plain dict: event, host, result, message, release, time, and who, author, seconds, with what the event
adds (commit, migrations, backup, detail).
"""

from __future__ import annotations

import getpass
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from deploy import notify
from deploy.commands import history as commands
from deploy.errors import DeployError

if TYPE_CHECKING:
    from deploy.site import Site
    from deploy.ssh import Server

KIT_REPO = Path(__file__).resolve().parent.parent


def who() -> str:
    """The operator: local user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


def git_author(repo: Path = KIT_REPO) -> str:
    """The operator's git identity in `repo` ("Name <email>": its own config, else the operator's global one), ""
    when git has none. A deploy asks the checkout it ships; the other commands the kit's."""
    parts = []
    for key in ("user.name", "user.email"):
        try:
            result = subprocess.run(["git", "-C", str(repo), "config", key], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return ""
        parts.append(result.stdout.strip())
    name, email = parts
    return f"{name} <{email}>" if email else name


def one_line(exc: BaseException) -> str:
    """An exception as the one line the record keeps."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def new_record(site: Site, event: str, **what: object) -> dict:
    """The record of `event` on `site`, started now; the action fills in what it learns (release, migrations...)."""
    return {
        "event": event,
        "host": site.name,
        "environment": site.config.name,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "who": who(),
        "author": git_author(),
        "result": "",
        "message": "",
        "release": None,
        "seconds": None,
        **what,
    }


@contextmanager
def recorded(site: Site, event: str, **what: object) -> Iterator[dict]:
    """Record `event` on `site`'s history when the block ends: ok, or failed with the error's one line; its
    duration. The block may add to the record it gets."""
    record = new_record(site, event, **what)
    started = time.monotonic()
    try:
        yield record
    except BaseException as exc:
        record.update(result="failed", message=one_line(exc))
        raise
    else:
        record["result"] = "ok"
    finally:
        record["seconds"] = round(time.monotonic() - started, 1)
        write(site, record)
        notify.announce_record(site.config, record, describe(record), site.history_server())


def write(site: Site, record: dict) -> None:
    """Append `record` on the site's primary; a failure is a warning (the command's own outcome stands). Nothing is
    written when no host was reached (the command's error says why)."""
    server = site.history_server()
    if server is None:
        return
    line = json.dumps(record, sort_keys=True, default=str)
    try:
        server.root(commands.append(server.config.layout.history, line), what="recording the history")
    except DeployError as exc:
        print(f"WARNING: {record['event']} was not recorded in the history: {exc}", file=sys.stderr, flush=True)


def read(server: Server, lines: int) -> list[dict]:
    """The last `lines` records of the history kept on `server` (the primary); a line that is not a record is shown
    as one that says so."""
    text = server.root(commands.last(server.config.layout.history, lines), what="reading the history").stdout
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        records.append(record if isinstance(record, dict) else {"event": "?", "message": "unreadable line"})
    return records


def describe(record: dict) -> str:
    """The WHAT column: the release, the commit, the migrations applied, the backup taken, the event's detail."""
    parts = []
    if record.get("release"):
        parts.append(str(record["release"]))
    if record.get("commit"):
        parts.append(f"commit {record['commit']}")
    names = [str(name) for name in record.get("migrations") or []]
    if names:  # a first deploy applies dozens: their count, the first and the last
        parts.append(
            f"migrations {', '.join(names)}"
            if len(names) <= 3
            else f"{len(names)} migrations {names[0]} ... {names[-1]}"
        )
    if record.get("backup"):
        parts.append(f"backup {record['backup']}")
    if record.get("detail"):
        parts.append(str(record["detail"]))
    return "; ".join(parts) or "-"


def format_table(records: list[dict]) -> str:
    """`fab history`: one row per record, oldest first; a failure's error on the line under its row."""
    if not records:
        return (
            "no history yet (it starts with the first provision, deploy, rollback, restore, env, maintenance or "
            "os-update)."
        )
    header = ("WHEN (UTC)", "EVENT", "RESULT", "TIME", "WHO", "WHAT")
    rows = []
    for record in records:
        when = str(record.get("time") or "?").replace("T", " ").rstrip("Z")
        seconds = record.get("seconds")
        took = f"{seconds:.1f} s" if isinstance(seconds, int | float) else "-"
        author = record.get("author") or ""
        by = f"{record.get('who') or '?'}{f' ({author})' if author else ''}"
        event, result = str(record.get("event") or "?"), str(record.get("result") or "?")
        rows.append((when, event, result, took, by, describe(record)))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row, record in zip([header, *rows], [None, *records], strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if record is not None and record.get("result") != "ok" and record.get("message"):
            lines.append(f"{'':{widths[0]}}  error: {record['message']}")
    return "\n".join(lines)
