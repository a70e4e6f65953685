"""Fixtures of the layers that run the real stack (integration, faults): the services, a database, a Redis db,
a Celery client and prodserver processes (each layer's conftest defines the `env` they run with).

Loaded for every layer by tests/conftest.py; each module gets a database and a Redis db of its own.
"""

import pytest

from tests.support import stack


@pytest.fixture(scope="session")
def services():
    reason = stack.services_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def database(services):
    db = stack.Database().create()
    yield db
    db.drop()


@pytest.fixture(scope="module")
def redis_db(services, request):
    number = stack.claim_redis_db(request.module.__name__)
    yield number
    stack.release_redis_db(number)


@pytest.fixture(scope="module")
def celery_client(env):
    """A bare Celery client on the stack's broker, to send tasks the way the web process does."""
    app = stack.celery_app(env["CELERY_BROKER_URL"])
    yield app
    app.close()


@pytest.fixture
def start(env, tmp_path):
    """Start `prodserver NAME` with extra env (log NAME-N.log); every process is stopped after the test."""
    started = []

    def _start(name, *args, **extra_env):
        process = stack.Process(name, {**env, **extra_env}, tmp_path, *args, log_name=f"{name}-{len(started)}")
        started.append(process)
        return process

    yield _start
    for process in started:
        process.stop()
