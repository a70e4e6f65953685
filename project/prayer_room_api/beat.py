"""Beat's scheduler: django-celery-beat's DatabaseScheduler that dispatches only while it holds the leader lock.

The lock is a PostgreSQL session-level advisory lock on a connection of beat's own (not Django's, which
Django closes and reopens at will). Any number of beats may run: one leads, the others wait as standbys
and try the lock every STANDBY_RETRY seconds. The lock goes with the leader's session:
- the leader exits or is killed (-9): the server sees the socket close and frees the lock at once;
- the leader's host or network dies: the server's TCP keepalives (set per session below) drop the
  session after about KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT seconds;
- the leader hangs: idle_session_timeout (PostgreSQL 14+) ends a session silent for LEASE seconds.
Fencing: the leader makes a round trip on its lock session before every dispatch (and on every tick);
when it fails, the leader stops dispatching, forgets its in-memory schedule and becomes a standby.
A due task the broker refuses (an outage) is kept and sent again every RESEND_INTERVAL until it goes.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from django.db import connections
from django_celery_beat.schedulers import DatabaseScheduler

logger = logging.getLogger(__name__)

# pg_try_advisory_lock(int, int): the pair shows in pg_locks as classid, objid (objsubid 2).
LOCK_KEY = (0x50524159, 0x42454154)  # "PRAY", "BEAT"
STANDBY_RETRY = 2.0  # seconds between a standby's tries
CHECK_INTERVAL = 5.0  # the leader's longest sleep between checks of its session
RESEND_INTERVAL = 5.0  # seconds between tries to send a due task the broker refused
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 4, 2, 3  # a dead peer is dropped after ~10 s
LEASE = 20  # seconds: idle_session_timeout of the lock session (the leader checks in every CHECK_INTERVAL)
APPLICATION_NAME = "prayer-room beat"

LEADER_SQL = """
SELECT a.application_name, host(a.client_addr), l.pid
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def lock_session_params(alias: str = "default") -> dict:
    """psycopg connect() arguments for Django's database, with keepalives that notice a dead peer."""
    params = connections[alias].get_connection_params()
    for django_only in ("context", "cursor_factory", "prepare_threshold"):
        params.pop(django_only, None)
    identity = f"{APPLICATION_NAME} {socket.gethostname()} pid {os.getpid()}"
    params.update(
        application_name=identity[:63],
        connect_timeout=5,
        keepalives=1,
        keepalives_idle=KEEPALIVE_IDLE,
        keepalives_interval=KEEPALIVE_INTERVAL,
        keepalives_count=KEEPALIVE_COUNT,
        # A query sent into a cut network fails after this many ms instead of the kernel's ~15 minutes.
        tcp_user_timeout=(KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT) * 1000,
        autocommit=True,
    )
    return params


def leaders(cursor) -> list[tuple]:
    """(application_name, client address, server pid) of each session holding the beat lock: one, or none."""
    cursor.execute(LEADER_SQL, LOCK_KEY)
    return cursor.fetchall()


class LeaderLock:
    """The advisory lock on a session of its own; every method answers False rather than raise on a lost session."""

    def __init__(self, alias: str = "default"):
        self.alias = alias
        self.conn = None
        self.unreachable = False  # logged once an outage, not at every try

    def _connect(self):
        import psycopg

        conn = psycopg.connect(**lock_session_params(self.alias))
        # Server side too: the server frees the lock only when it drops the session.
        conn.execute(f"SET tcp_keepalives_idle = {KEEPALIVE_IDLE}")
        conn.execute(f"SET tcp_keepalives_interval = {KEEPALIVE_INTERVAL}")
        conn.execute(f"SET tcp_keepalives_count = {KEEPALIVE_COUNT}")
        conn.execute("SET statement_timeout = '5s'")
        if conn.info.server_version >= 140000:
            conn.execute(f"SET idle_session_timeout = '{LEASE}s'")
        return conn

    def try_acquire(self) -> bool:
        import psycopg

        try:
            if self.conn is None or self.conn.closed:
                self.conn = self._connect()
            taken = bool(self.conn.execute("SELECT pg_try_advisory_lock(%s, %s)", LOCK_KEY).fetchone()[0])
        except psycopg.Error as exc:
            if not self.unreachable:
                logger.warning("beat: cannot reach the database for the leader lock: %s", _first_line(exc))
            self.unreachable = True
            self.close()
            return False
        self.unreachable = False
        return taken

    def still_held(self) -> bool:
        """A round trip on the lock's session: while the session lives, the lock is ours."""
        import psycopg

        if self.conn is None:
            return False
        try:
            self.conn.execute("SELECT 1").fetchone()
            return True
        except psycopg.Error as exc:
            logger.error("beat: lost the leader lock's session (%s); dispatching stops", _first_line(exc))
            self.close()
            return False

    def holder(self) -> str:
        try:
            with self.conn.cursor() as cursor:
                rows = leaders(cursor)
        except Exception:  # noqa: BLE001 - only used for a log line
            return "another beat"
        if not rows:
            return "another beat (just released)"
        name, address, pid = rows[0]
        return f"{name or '?'} (server pid {pid}{', from ' + address if address else ''})"

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        self.conn = None


class LeaderDatabaseScheduler(DatabaseScheduler):
    """DatabaseScheduler that dispatches only while it holds the leader lock; a standby otherwise."""

    def __init__(self, *args, **kwargs):
        self._lock = None
        self._leading = False
        self._standby_logged_at = None
        self._unsent = {}  # name -> the due entry the broker refused, sent again every RESEND_INTERVAL
        self._unsent_at = 0.0
        super().__init__(*args, **kwargs)
        if connections["default"].vendor == "postgresql":
            self._lock = LeaderLock()
        else:
            logger.warning(
                "beat: no leader lock on %s (PostgreSQL only): run a single beat", connections["default"].vendor
            )
            self._leading = True

    def _lead(self) -> bool:
        """Whether this beat leads now: keeps a held lock, or tries to take a free one."""
        if self._lock is None:
            return True
        if self._leading:
            if self._lock.still_held():
                return True
            self._demote()
            return False
        if self._lock.try_acquire():
            self._leading, self._standby_logged_at = True, None
            # The old leader wrote last_run_at as it dispatched: start from the database, not from memory.
            self._dirty.clear()
            self._initial_read, self._heap, self._schedule = True, None, None
            logger.warning("beat: took the leader lock; this beat dispatches (%s)", APPLICATION_NAME)
            return True
        now = time.monotonic()
        if self._standby_logged_at is None or now - self._standby_logged_at > 300:
            held_by = self._lock.holder() if self._lock.conn is not None else "unknown (database unreachable)"
            logger.warning("beat: standby: the leader lock is held by %s; waiting to take over", held_by)
            self._standby_logged_at = now
        return False

    def _demote(self) -> None:
        self._leading = False
        self._dirty.clear()
        self._unsent.clear()
        self._heap = None

    def tick(self, *args, **kwargs):
        if not self._lead():
            return STANDBY_RETRY
        if self._unsent and time.monotonic() - self._unsent_at >= RESEND_INTERVAL:
            self._resend()
        return min(super().tick(*args, **kwargs), CHECK_INTERVAL)

    def _fenced(self) -> bool:
        """True when this beat may not dispatch: no round trip just now proved the lock's session alive."""
        if self._lock is not None and not (self._leading and self._lock.still_held()):
            self._demote()
            return True
        return False

    def apply_entry(self, entry, producer=None):
        # NOTE: fencing: no dispatch without a round trip proving the lock's session is alive just now.
        if self._fenced():
            logger.error("beat: not the leader any more; %s not sent", entry.name)
            return
        logger.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        try:
            self.apply_async(entry, producer=producer, advance=False)
        except Exception as exc:  # noqa: BLE001 - a broker outage: the entry is kept and sent again
            # NOTE: Celery's own apply_entry logs and drops it: a daily digest due during an outage was lost.
            logger.error("beat: %s not sent (%s); sending it again every %s s", entry.name, exc, RESEND_INTERVAL)
            self._unsent[entry.name] = entry
            self._unsent_at = time.monotonic()

    def _resend(self) -> None:
        """Send the due entries the broker refused, one try each; those refused again wait for the next round."""
        for name, entry in list(self._unsent.items()):
            if self._fenced():
                return
            try:
                self.apply_async(entry, producer=self.producer, advance=False)
            except Exception:  # noqa: BLE001 - still down: keep it
                self._unsent_at = time.monotonic()
                return
            del self._unsent[name]
            logger.warning("beat: %s sent after the broker came back", name)

    def sync(self):
        if self._leading:
            super().sync()

    def close(self):
        try:
            super().close()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._leading = False


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
