"""The real stack for integration tests: PostgreSQL, Redis and prodserver processes."""

import pytest

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
