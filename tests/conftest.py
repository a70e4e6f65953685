"""Shared test set-up: the session's PostgreSQL for Django's test database; in CI (CI=true) a skipped test
is a failure, so no layer silently stops running."""

import os
import time
from collections.abc import Callable

import pytest
from psycopg.conninfo import conninfo_to_dict
from pytest_django.fixtures import validate_django_db

from tests.support import services

# The real-stack layers' fixtures (services, database, redis_db); the archive tests' S3 server (s3_server).
pytest_plugins = ["tests.support.fixtures", "tests.support.s3"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
RELOAD_MIGRATED_ROWS = pytest.StashKey[Callable[[], None]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every layer must run: {reason}"


_module_seconds: dict[str, float] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each module's wall time, its module fixtures' set-up and teardown included (for balancing the sessions)."""
    started = time.monotonic()
    yield
    module = item.location[0]
    _module_seconds[module] = _module_seconds.get(module, 0.0) + time.monotonic() - started


def pytest_terminal_summary(terminalreporter):
    slow = sorted(((seconds, module) for module, seconds in _module_seconds.items() if seconds >= 30), reverse=True)
    if slow:
        terminalreporter.write_sep("=", "modules that took 30 s or more (their fixtures' set-up and teardown included)")
        for seconds, module in slow:
            terminalreporter.write_line(f"{seconds:8.1f} s  {module}")


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """Django's test database on the session's PostgreSQL (tests/support/services.py), unless DATABASE_URL is set."""
    if os.environ.get("DATABASE_URL"):
        return
    from django.conf import settings

    reason = services.unavailable()
    if reason:
        pytest.fail(f"no PostgreSQL for the test database: {reason}", pytrace=False)
    info = conninfo_to_dict(services.postgres_url())
    settings.DATABASES["default"].update(
        HOST=info.get("host", "127.0.0.1"),
        PORT=str(info.get("port", "5432")),
        USER=info.get("user", "postgres"),
        PASSWORD=info.get("password", ""),
    )


def flushes_the_database(item: pytest.Item) -> bool:
    """Whether pytest-django runs the test as a TransactionTestCase, whose teardown empties every table."""
    marker = item.get_closest_marker("django_db")
    if marker is not None:
        transaction, reset_sequences, *_ = validate_django_db(marker)
        if transaction or reset_sequences:
            return True
    return not {"transactional_db", "live_server", "django_db_reset_sequences"}.isdisjoint(item.fixturenames)


@pytest.fixture(scope="session", autouse=True)
def migrated_rows_reloader(request, django_db_blocker):
    """Gives the teardown hook below a way to reload the rows the migrations wrote (it needs the db blocker)."""

    def reload():
        from django.db import connections

        with django_db_blocker.unblock():
            for connection in connections.all(initialized_only=True):
                contents = getattr(connection, "_test_serialized_contents", None)
                if contents is None:
                    pytest.fail(
                        "a transactional test emptied the database and nothing can restore what the migrations wrote:"
                        " mark it @pytest.mark.django_db(transaction=True, serialized_rollback=True)",
                        pytrace=False,
                    )
                connection.creation.deserialize_db_from_string(contents)

    request.config.stash[RELOAD_MIGRATED_ROWS] = reload
    yield
    del request.config.stash[RELOAD_MIGRATED_ROWS]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    """After a transactional test has flushed every table, reload what the migrations wrote (the seeded
    schedules, content types): Django's serialized_rollback reloads it only when such a test starts, so the
    tests after it would otherwise see an emptied database, whatever order they run in."""
    result = yield
    if flushes_the_database(item) and RELOAD_MIGRATED_ROWS in item.config.stash:
        item.config.stash[RELOAD_MIGRATED_ROWS]()
    return result
