"""The bench's own stack: a seeded PostgreSQL database, a Redis db, any server command run like prodserver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from tests.support.stack import MANAGE, REPO, Database, Process, manage, production_env, redis_url

PROJECT = REPO / "project"
BIN = Path(sys.executable).parent
# NOTE: a Redis db of the bench's own, flushed before each run; the tests use 11-14.
# The worker benchmark also uses the next one, for its second worker.
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "9"))


class Command(Process):
    """Any command (gunicorn, celery) run the way `Process` runs `manage.py prodserver NAME`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=PROJECT, start_new_session=True
        )


def prodserver(name: str, env: dict[str, str], log_dir: Path) -> Command:
    return Command(f"prodserver-{name}", [sys.executable, str(MANAGE), "prodserver", name], env, log_dir)


def cli_args(args: dict) -> list[str]:
    """PRODUCTION_PROCESSES ARGS as django-prodserver passes them: --name=value, or --name for None."""
    return [f"--{name}" if value is None else f"--{name}={value}" for name, value in args.items()]


class BenchDatabase(Database):
    """A throwaway database that can also be cloned from a seeded template (fast: a file copy)."""

    def create_from(self, template: Database) -> BenchDatabase:
        import psycopg

        from tests.support.stack import postgres_url

        with psycopg.connect(postgres_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}" TEMPLATE "{template.name}"')
        return self


def bench_env(database: Database, **extra: str) -> dict[str, str]:
    """Production settings against the bench database and Redis db, the repo importable."""
    env = production_env(database, REDIS_DB, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), str(REPO), env.get("PYTHONPATH", "")]))
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env


def migrated(database: Database, env: dict[str, str]) -> None:
    manage(env, "migrate", "--noinput")


def flush_redis(db: int = REDIS_DB) -> redis.Redis:
    client = redis.Redis.from_url(f"{redis_url()}/{db}")
    client.flushdb()
    return client


def setup_django(env: dict[str, str]) -> None:
    """Configure Django in this process for `env` (once per process: settings are read at setup)."""
    import django

    os.environ.update(env)
    for path in (str(PROJECT), str(REPO)):
        if path not in sys.path:
            sys.path.insert(0, path)
    django.setup()
