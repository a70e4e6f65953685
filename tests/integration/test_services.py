"""The tests' own servers (tests/support/services.py): started, stopped, killed and started again on the same data."""

import shutil

import psycopg
import pytest
import redis

from tests.support import services

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch():
    path = services.scratch_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_private_postgres_keeps_its_port_and_data_over_a_stop_and_a_kill(scratch):
    server = services.PostgresServer(scratch / "pg").start()
    try:
        port = server.port
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE kept")
        server.stop()
        assert not server.running
        try:
            psycopg.connect(server.url, connect_timeout=2).close()
            raise AssertionError("a stopped server still answered")
        except psycopg.OperationalError:
            pass
        server.start()
        server.kill()
        server.start()
        assert server.port == port
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = 'kept'").fetchall() == [(1,)]
    finally:
        server.stop()


def test_a_persistent_private_redis_keeps_its_data_over_a_restart(tmp_path):
    server = services.RedisServer(tmp_path / "redis", persist=True).start()
    try:
        client = redis.Redis(port=server.port)
        client.set("kept", "yes")
        server.stop()
        server.start()
        assert client.get("kept") == b"yes"
    finally:
        server.stop()


def test_claimed_redis_dbs_are_distinct_until_released():
    first, second = services.claim_redis_db("a"), services.claim_redis_db("b")
    try:
        assert first != second
        services.release_redis_db(first)
        assert services.claim_redis_db("c") == first
    finally:
        services.release_redis_db(first)
        services.release_redis_db(second)
