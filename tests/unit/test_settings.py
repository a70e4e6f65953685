"""Production settings refuse to start half-configured and pass Django's deployment checks."""

import os
import secrets
import subprocess
import sys

import pytest

from tests.support.stack import MANAGE


def manage_with(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL"}}
    base["DJANGO_SETTINGS_MODULE"] = "prayer_room_api.settings.production"
    return subprocess.run(
        [sys.executable, str(MANAGE), *args], env={**base, **env}, capture_output=True, text=True, timeout=120
    )


PRODUCTION = {
    "SECRET_KEY": secrets.token_urlsafe(50),
    "ALLOWED_HOSTS": "prayer.example.org",
    "DATABASE_URL": "postgres://prayer-room@db.example.org:5432/prayer_room",  # checks do not connect
}


def test_check_deploy_is_clean_behind_a_tls_proxy():
    result = manage_with(PRODUCTION, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("SECRET_KEY", "SECRET_KEY is not set"),
        ("ALLOWED_HOSTS", "ALLOWED_HOSTS is not set"),
    ],
)
def test_production_refuses_to_start_without_a_required_setting(missing, message):
    env = {k: v for k, v in PRODUCTION.items() if k != missing}
    result = manage_with(env, "check")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_production_refuses_sqlite():
    result = manage_with({**PRODUCTION, "DATABASE_URL": "sqlite:////tmp/x.sqlite3"}, "check")
    assert result.returncode != 0
    assert "DATABASE_URL must point at PostgreSQL" in result.stderr


def test_a_bad_number_names_the_variable():
    result = manage_with({**PRODUCTION, "WEB_WORKERS": "two"}, "check")
    assert result.returncode != 0
    assert "WEB_WORKERS must be a whole number, got 'two'" in result.stderr


PASSWORD = secrets.token_urlsafe(16)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        # The value that is wrong carries the secret: an error quoting it would print the secret.
        ({"DATABASE_URL": f"mysql://prayer:{PASSWORD}@db.example.org/prayer"}, "DATABASE_URL must point at PostgreSQL"),
        ({"CACHE_URL": f"bogus://prayer:{PASSWORD}@cache.example.org"}, "Invalid cache schema bogus"),
        ({"EMAIL_URL": f"bogus://prayer:{PASSWORD}@smtp.example.org:587"}, "Invalid email schema bogus"),
        ({"CACHE_URL": "locmemcache://"}, "CACHE_URL must be shared"),
    ],
)
def test_no_secret_is_printed_in_a_configuration_error(wrong, message):
    env = {
        **PRODUCTION,
        "EMAIL_URL": f"smtp+tls://prayer:{PASSWORD}@smtp.example.org:587",
        "CACHE_URL": f"redis://:{PASSWORD}@127.0.0.1:6379/1",
        **wrong,
    }
    result = manage_with(env, "check")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in result.stderr, output
    assert PRODUCTION["SECRET_KEY"] not in output
    assert PASSWORD not in output


def test_production_refuses_a_per_process_cache_for_rate_limits():
    result = manage_with({**PRODUCTION, "CACHE_URL": "locmemcache://"}, "check")
    assert result.returncode != 0
    assert "CACHE_URL must be shared by all web workers" in result.stderr


def test_production_caches_json_in_redis_and_refuses_a_backend_that_pickles():
    shown = manage_with(
        PRODUCTION,
        "shell",
        "-c",
        "from django.core.cache import caches; c = caches['default']; print(type(c).__name__, c.make_key('k'))",
    )
    assert shown.stdout.splitlines()[-1].split() == ["JSONRedisCache", "prayer-room:cache:2:k"], shown.stderr
    for url in ("pymemcache://127.0.0.1:11211", "filecache:///tmp/prayer-room-cache", "dbcache://cache_table"):
        refused = manage_with({**PRODUCTION, "CACHE_URL": url}, "check")
        assert refused.returncode != 0
        assert "CACHE_URL must be a Redis URL in production" in refused.stderr, refused.stderr


def test_the_soft_time_limit_follows_a_lower_hard_limit_and_may_not_exceed_it():
    shown = manage_with(
        {**PRODUCTION, "CELERY_TASK_TIME_LIMIT": "60"},
        "shell",
        "-c",
        "from django.conf import settings as s; "
        "print(s.CELERY_TASK_SOFT_TIME_LIMIT, s.CELERY_BROKER_TRANSPORT_OPTIONS['visibility_timeout'])",
    )
    assert shown.stdout.splitlines()[-1].split() == ["48", "150"], shown.stderr
    refused = manage_with({**PRODUCTION, "CELERY_TASK_TIME_LIMIT": "60", "CELERY_TASK_SOFT_TIME_LIMIT": "90"}, "check")
    assert refused.returncode != 0
    assert "CELERY_TASK_SOFT_TIME_LIMIT (90) must not exceed CELERY_TASK_TIME_LIMIT (60)" in refused.stderr


def test_production_has_no_basic_auth_and_locks_logins_out():
    code = (
        "from django.conf import settings as s; "
        "print(s.REST_FRAMEWORK['DEFAULT_AUTHENTICATION_CLASSES'], s.AUTHENTICATION_BACKENDS[0], s.AXES_FAILURE_LIMIT)"
    )
    result = manage_with(PRODUCTION, "shell", "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split() == [
        "['rest_framework.authentication.SessionAuthentication']",
        "prayer_room_api.backends.AxesBackend",
        "5",
    ]
