"""Database backups on the server: pg_dump -Fc into the root-only backups directory, listed, restored, downloaded."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.commands import backup as backup_commands
from deploy.commands import sh
from deploy.errors import DeployError
from deploy.ssh import Server

DAY = 24 * 3600


def _run(server: Server, command: str, *, what: str, wrap=None) -> dict:
    result = server.root(wrap(command) if wrap else command, what=what, warn=True, timeout=3600)
    return server.helper_lines(result, what=what)[-1]


def take(server: Server, kind: str, release: str | None, wrap=None) -> dict:
    """A new backup of `kind` (manual, deploy, restore, daily) named after `release`; returns its record."""
    command = backup_commands.take(server.config, kind, release)
    return _run(server, command, what="backing up the database (pg_dump)", wrap=wrap)["backup"]


def records(server: Server) -> tuple[list[dict], int]:
    """The backups on the server, oldest first, and the server's clock."""
    answer = _run(server, backup_commands.listing(server.config), what="listing the backups")
    return answer["backups"], answer["now"]


def find(server: Server, name: str) -> dict:
    found, _ = records(server)
    for record in found:
        if record["name"] == name:
            return record
    names = ", ".join(r["name"] for r in found[-5:]) or "none"
    raise DeployError(f"{server.name} has no backup {name!r}; the newest: {names} (`fab backups` lists all).")


def restore(server: Server, name: str, wrap=None) -> dict:
    """Replace the database with backup `name` in one transaction (the programs must be stopped). When the helper
    stops without committing it (killed, or its connection lost), the schema it had set aside is put back."""
    aside = f"public_before_restore_{int(time.time())}"
    try:
        return _run(server, backup_commands.restore(server.config, name, aside), what=f"restoring {name}", wrap=wrap)
    except DeployError as exc:
        try:
            settled = recover(server, put_back=aside, wrap=wrap)
        except DeployError as again:
            raise DeployError(f"{exc}; and then {again}") from exc
        if settled:
            raise DeployError(f"{exc}; {settled['note']}") from exc
        raise


def recover(server: Server, put_back: str = "", wrap=None) -> dict:
    """Settle a restore stopped between its transactions (deploy/on_server/root_helper.py `recover_interrupted`):
    {} when there was none, else what was done and a note for the operator."""
    command = backup_commands.recover(server.config, put_back)
    return _run(server, command, what="checking for an interrupted restore", wrap=wrap)["interrupted"]


def interrupted_restore(server: Server, wrap=None) -> dict:
    """What a restore stopped between its transactions left (its set-aside schema), changing nothing: {} when none,
    else the schema, how many relations `public` holds, and a note."""
    command = backup_commands.recover(server.config, check=True)
    return _run(server, command, what="checking for an interrupted restore", wrap=wrap)["interrupted"]


def interrupted_restore_fix(found: dict) -> str:
    """What settles the state `interrupted_restore` found, in words for the operator."""
    schema = found["schema"]
    if found.get("public_relations"):  # that restore committed: public holds its data (or writes since)
        return (
            "check the site (`fab restore NAME --yes` again serves a backup), then drop the set-aside schema as the "
            f"database's owner (DROP SCHEMA {schema} CASCADE)"
        )
    return f"run `fab restore NAME --yes` again: it first puts {schema} back as public, then restores NAME"


def refuse_after_interrupted_restore(server: Server, command: str) -> None:
    """Refuse `command` (a deploy or a rollback, which would migrate or serve whatever the database holds) in one
    line while a restore stopped between its transactions has left its set-aside schema."""
    found = interrupted_restore(server)
    if found:
        raise DeployError(f"{command} refused, nothing changed: {found['note']}; {interrupted_restore_fix(found)}.")


def download(server: Server, record: dict, to: Path) -> Path:
    """Copy a backup to the operator's machine (through a private temporary copy) into a new file of mode 0600 (never
    over an existing file or link), and check its sha256."""
    import hashlib

    to = to / record["name"] if to.is_dir() else to
    try:
        local = os.open(to, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise DeployError(
            f"{to} exists: a download never replaces a file; give --download a new name or a directory (the backup "
            f"{record['name']} is on the server)."
        ) from None
    except OSError as exc:
        raise DeployError(f"cannot create {to} ({exc.strerror}); give --download a writable path.") from None
    complete = False
    try:
        with os.fdopen(local, "wb") as file:
            tmp = server.conn.run("mktemp", hide=True, in_stream=False).stdout.strip()
            try:
                staging = backup_commands.stage_download(server.config, record["name"], tmp, server.conn.user)
                server.root(staging, what="staging the download")
                server.conn.get(tmp, file)
            finally:
                server.conn.run(sh("rm", "-f", tmp), hide=True, in_stream=False, warn=True)
        if hashlib.sha256(to.read_bytes()).hexdigest() != record["sha256"]:
            raise DeployError(f"the download of {record['name']} does not match its sha256; try again.")
        complete = True
    finally:
        if not complete:
            to.unlink(missing_ok=True)
    return to


def age(seconds: float) -> str:
    """A short age: 45 s, 12 min, 5 h, 3 d."""
    if seconds < 90:
        return f"{int(seconds)} s"
    if seconds < 90 * 60:
        return f"{int(seconds // 60)} min"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / DAY:.0f} d"


def size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_list(found: list[dict], now: float) -> str:
    """One line per backup, newest first: name, kind, release, size, age."""
    if not found:
        return "no backups yet: `fab backup` takes one (a daily timer and every deploy with migrations do too)."
    lines = [f"{'NAME':44} {'KIND':7} {'RELEASE':28} {'SIZE':>9}  AGE"]
    for r in reversed(found):
        lines.append(
            f"{r['name']:44} {r['kind']:7} {r['release']:28} {size(r['size']):>9}  {age(now - r['created'])} ago"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Timer:
    """The daily backup timer as systemd has it: installed (loaded), enabled, active (waiting), its next run."""

    loaded: bool
    enabled: bool
    active: bool
    next_run: int | None  # Unix time
    now: int

    @property
    def waiting(self) -> bool:
        return self.loaded and self.enabled and self.active


def parse_timer(text: str) -> Timer | None:
    """commands.backup.timer_state's output; None when systemctl did not answer (a server without systemd)."""
    facts = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if "LoadState" not in facts or not facts.get("now", "").isdigit():
        return None
    elapse = facts.get("next", "")
    return Timer(
        loaded=facts["LoadState"] == "loaded",
        enabled=facts.get("UnitFileState") == "enabled",
        active=facts.get("ActiveState") == "active",
        next_run=int(elapse) if elapse.isdigit() else None,
        now=int(facts["now"]),
    )


def read_timer(server: Server) -> Timer | None:
    """The daily backup timer's state on `server` (None without systemd)."""
    return parse_timer(server.root(backup_commands.timer_state(), what="reading the backup timer", warn=True).stdout)


TIMER_HINT = "`fab provision` installs and starts it"


def freshness(found: list[dict], now: float, timer: Timer | None = None) -> str:
    """The status line about the last backup and the daily timer (`timer`, None when unknown): a WARNING when the
    timer is not waiting, or no backup is there and the timer is unknown, or the last backup is older than a day.
    Before the timer's first run (as right after `fab provision`), no backup is the normal state, not a warning."""
    stopped = timer is not None and not timer.waiting
    if stopped:
        state = "not installed" if not timer.loaded else "not enabled" if not timer.enabled else "not active"
        trouble = f"the daily timer is {state}: {TIMER_HINT}"
    if not found:
        if stopped:
            return f"backups: WARNING none on the server and {trouble} (`fab backup` takes one now)"
        if timer is None:
            return (
                "backups: WARNING no backup on the server; run `fab backup` (and `fab provision` for the daily timer)"
            )
        first = f" in {age(max(0, timer.next_run - timer.now))}" if timer.next_run else ""
        return f"backups: none yet; the daily timer takes the first{first} (`fab backup` takes one now)"
    last = max(found, key=lambda r: r["created"])
    line = f"backups: last {last['name']} ({last['kind']}), {age(now - last['created'])} ago, {len(found)} kept"
    if stopped:
        line += f"; WARNING {trouble}"
    elif now - last["created"] > DAY:
        line += "; WARNING older than a day: is the daily timer running? (systemctl status prayer-room-backup.timer)"
    return line
