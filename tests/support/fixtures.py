"""Fixtures of the layers that run the real stack (integration, faults): the services, a database, a Redis db.

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
