"""Run the real stack for tests: a throwaway PostgreSQL database, a Redis db, prodserver processes.

The servers are the session's (tests/support/services.py): `postgres_url()` and `redis_url()`;
`POSTGRES_ADMIN_URL` and `REDIS_URL` are the same, resolved when first read."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from celery import Celery

from deploy.render.db_host import REDIS_KEY_PREFIX as KEY_PREFIX
from tests.support.services import (
    app_redis_url,
    claim_redis_db,
    free_port,
    postgres_url,
    redis_url,
    release_redis_db,
)
from tests.support.services import unavailable as services_unavailable

REPO = Path(__file__).resolve().parents[2]
MANAGE = REPO / "project" / "manage.py"

__all__ = [
    "app_redis_url",
    "claim_redis_db",
    "free_port",
    "postgres_url",
    "redis_url",
    "release_redis_db",
    "services_unavailable",
]


def __getattr__(name: str) -> str:
    if name == "POSTGRES_ADMIN_URL":
        return postgres_url()
    if name == "REDIS_URL":
        return redis_url()
    raise AttributeError(name)


@dataclass
class Database:
    """A PostgreSQL database of its own, dropped afterwards."""

    name: str = field(default_factory=lambda: f"prayer_room_it_{secrets.token_hex(4)}")

    @property
    def url(self) -> str:
        return postgres_url().rsplit("/", 1)[0] + f"/{self.name}"

    def create(self) -> Database:
        with psycopg.connect(postgres_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        with psycopg.connect(postgres_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []


def celery_app(broker: str, backend: str | None = None, **kwargs) -> Celery:
    """A bare Celery client on `broker` that names its Redis keys as the project's settings do (under the prefix the
    app's Redis ACL user is limited to), to send tasks the way the web process does."""
    app = Celery(broker=broker, backend=backend or broker, **kwargs)
    app.conf.broker_transport_options = app.conf.result_backend_transport_options = {"global_keyprefix": KEY_PREFIX}
    return app


def production_env(database: Database, redis_db: int, **extra: str) -> dict[str, str]:
    """Environment for the production settings against the test services (no TLS proxy in front)."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="prayer_room_api.settings.production",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        DATABASE_URL=database.url,
        CELERY_BROKER_URL=app_redis_url(redis_db),  # as the app's ACL user on a server
        CACHE_URL=app_redis_url(redis_db),
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
        self._log = self.log_path.open("ab")  # appended: a child may open the same file again (/dev/stdout)
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
