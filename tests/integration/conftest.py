"""The real stack for integration tests: PostgreSQL, Redis and prodserver processes."""

import pytest
from celery import Celery

from tests.support import stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(database, redis_db, tmp_path_factory):
    static_root = tmp_path_factory.mktemp("static")
    env = stack.production_env(
        database, redis_db, WORKER_CONCURRENCY="2", WEB_WORKERS="2", STATIC_ROOT=str(static_root)
    )
    stack.manage(env, "migrate", "--noinput")
    # The production settings name static files by their content hash, read from collectstatic's manifest.
    stack.manage(env, "collectstatic", "--noinput")
    return env


@pytest.fixture(scope="module")
def celery_client(env):
    """A bare Celery client on the stack's broker, to send tasks the way the web process does."""
    app = Celery(broker=env["CELERY_BROKER_URL"], backend=env["CELERY_BROKER_URL"])
    yield app
    app.close()


@pytest.fixture
def start(env, tmp_path):
    """Start `prodserver NAME` with extra env; every process is stopped after the test."""
    started = []

    def _start(name, *args, **extra_env):
        process = stack.Process(name, {**env, **extra_env}, tmp_path, *args)
        started.append(process)
        return process

    yield _start
    for process in started:
        process.stop()
