"""The fault layer: real prodserver processes on real PostgreSQL and Redis, killed and cut off on purpose."""

import re

import pytest

from tests.support import stack

pytestmark = pytest.mark.faults

SUCCEEDED = re.compile(r"Task prayer_room_api\.tasks\.ping\[([^\]]+)\] succeeded")
RECEIVED = re.compile(r"Task prayer_room_api\.tasks\.ping\[([^\]]+)\] received")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="module")
def env(database, redis_db):
    env = stack.production_env(database, redis_db, WORKER_CONCURRENCY="2", CELERY_TASK_TIME_LIMIT="5")
    stack.manage(env, "migrate", "--noinput")
    return env


def add_interval_task(database, name: str, task: str, every: int, args: str = "[]") -> None:
    """A periodic task every `every` seconds, saved the way beat notices at once."""
    database.query("INSERT INTO django_celery_beat_intervalschedule (every, period) VALUES (%s, 'seconds')", (every,))
    (interval_id,) = database.query("SELECT max(id) FROM django_celery_beat_intervalschedule")[0]
    database.query(
        """INSERT INTO django_celery_beat_periodictask
           (name, task, args, kwargs, enabled, interval_id, total_run_count, date_changed, description,
            one_off, headers)
           VALUES (%s, %s, %s, '{}', true, %s, 0, now(), '', false, '{}')""",
        (name, task, args, interval_id),
    )
    database.query("UPDATE django_celery_beat_periodictasks SET last_update = now() WHERE ident = 1")


def report(line: str) -> None:
    """A measured figure, printed with -s and kept in the terminal summary of failures."""
    print(f"\nMEASURED {line}")
