"""Shared test set-up: the session's PostgreSQL for Django's test database; in CI (CI=true) a skipped test
is a failure, so no layer silently stops running."""

import os

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.support import services

# The real-stack layers' fixtures (services, database, redis_db); the archive tests' S3 server (s3_server).
pytest_plugins = ["tests.support.fixtures", "tests.support.s3"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every layer must run: {reason}"


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
