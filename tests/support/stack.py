"""Run the real stack for tests: a throwaway PostgreSQL database, a Redis db, prodserver processes."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

REPO = Path(__file__).resolve().parents[2]
MANAGE = REPO / "project" / "manage.py"
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def services_unavailable() -> str | None:
    """Why PostgreSQL or Redis cannot be reached, or None when both answer."""
    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {exc}"
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} is not reachable: {exc}"
    return None


@dataclass
class Database:
    """A PostgreSQL database of its own, dropped afterwards."""

    name: str = field(default_factory=lambda: f"prayer_room_it_{secrets.token_hex(4)}")

    @property
    def url(self) -> str:
        return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.name}"

    def create(self) -> Database:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []


def production_env(database: Database, redis_db: int, **extra: str) -> dict[str, str]:
    """Environment for the production settings against the test services (no TLS proxy in front)."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="prayer_room_api.settings.production",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        DATABASE_URL=database.url,
        CELERY_BROKER_URL=f"{REDIS_URL}/{redis_db}",
        CACHE_URL=f"{REDIS_URL}/{redis_db}",
        EMAIL_URL="consolemail://",
        SECURE_SSL_REDIRECT="false",
        SECURE_COOKIES="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(MANAGE), *args], env=env, capture_output=True, text=True, check=check, timeout=300
    )


class Process:
    """A process under test with its output in a log file; by default `manage.py prodserver NAME`."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_dir: Path,
        *extra_args: str,
        argv: list[str] | None = None,
        log_name: str | None = None,
    ):
        self.name = name
        self.log_path = log_dir / f"{log_name or name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv or [sys.executable, str(MANAGE), "prodserver", name, *extra_args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO / "project",
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before {what}:\n{self.output()}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {what} within {timeout} s:\n{self.output()[-4000:]}")

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        self.wait_for(lambda: text in self.output(), timeout, f"{text!r} in its output")

    def wait_for_http(self, url: str, timeout: float = 60) -> None:
        self.wait_for(lambda: http_status(url) == 200, timeout, f"HTTP 200 from {url}")

    def stop(self, timeout: float = 30) -> int:
        """TERM (what supervisord sends), then KILL the group if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # nothing of the group may outlive a test
        except ProcessLookupError:
            pass
        self._log.close()
        return self.popen.returncode


def http_status(url: str, timeout: float = 2) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None
