"""The site's database on a test server, read as PostgreSQL's superuser there: for the archive's tests and its
benchmark (bench/archive.py)."""

from __future__ import annotations

import shlex
import time

from tests.support.nspawn import Container


def sql(server: Container, statement: str, database: str = "prayer_room") -> str:
    """One statement in the site's database; its rows, one a line."""
    command = f"cd / && runuser -u postgres -- psql -AtX -d {database} -c {shlex.quote(statement)}"
    return server.ssh(command).stdout.strip()


def archive_now(server: Container, timeout: float = 60) -> None:
    """Close the WAL segment being written and wait until the archive has it (and so every one before it)."""
    segment = sql(server, "SELECT pg_walfile_name(pg_switch_wal())")
    deadline = time.monotonic() + timeout
    while sql(server, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < segment:
        assert time.monotonic() < deadline, f"{segment} did not reach the archive in {timeout} s"
        time.sleep(0.5)
