"""Fixtures for the domain's unit tests: users, locations, requests, an API client, counted email connections."""

from __future__ import annotations

import itertools
import os
import smtplib

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.mail.backends.locmem import EmailBackend
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from prayer_room_api.models import Location, PrayerRequest, UserProfile
from tests.support import services

_serial = itertools.count(1)


class ConnectionCountingBackend(EmailBackend):
    """The locmem backend, counting how often a connection is opened."""

    opened = 0

    def open(self):
        type(self).opened += 1
        return super().open()


class BouncingBackend(EmailBackend):
    """The locmem backend, refusing recipients whose address starts with "bounce"."""

    def send_messages(self, messages):
        for message in messages:
            refused = [to for to in message.to if to.startswith("bounce")]
            if refused:
                raise smtplib.SMTPRecipientsRefused(dict.fromkeys(refused, (550, b"no such user")))
        return super().send_messages(messages)


@pytest.fixture(scope="session", autouse=True)
def session_broker():
    """Celery's broker (what /health/ and the outbox reach) is a db of the session's Redis, unless
    CELERY_BROKER_URL is set: tasks still run eagerly, in the test."""
    if os.environ.get("CELERY_BROKER_URL"):
        yield
        return
    from prayer_room_api.celery import app

    number = services.claim_redis_db("unit")
    saved = app.conf.broker_url, app.conf.result_backend
    app.conf.broker_url = app.conf.result_backend = f"{services.redis_url()}/{number}"
    yield
    app.conf.broker_url, app.conf.result_backend = saved
    services.release_redis_db(number)


@pytest.fixture(scope="session", autouse=True)
def session_cache():
    """The cache is production's (JSON entries in Redis, prayer_room_api/cache.py) on a db of the session's Redis,
    so a value the cache cannot hold fails here as it would on a server, not only there."""
    number = services.claim_redis_db("unit-cache")
    production = {
        "BACKEND": "prayer_room_api.cache.JSONRedisCache",
        "LOCATION": f"{services.redis_url()}/{number}",
        "KEY_PREFIX": "prayer-room:cache",
        "VERSION": 2,
    }
    with override_settings(CACHES={"default": production}):
        yield production
    services.release_redis_db(number)


@pytest.fixture(autouse=True)
def fresh_throttle_counters(session_cache):
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def counted_connections(settings):
    settings.EMAIL_BACKEND = f"{__name__}.ConnectionCountingBackend"
    ConnectionCountingBackend.opened = 0
    return ConnectionCountingBackend


class UnreachableBackend(EmailBackend):
    """A mail server that cannot be reached."""

    def open(self):
        raise ConnectionRefusedError("mail server unreachable")


@pytest.fixture
def unreachable_email(settings):
    settings.EMAIL_BACKEND = f"{__name__}.UnreachableBackend"


@pytest.fixture
def bouncing_email(settings):
    settings.EMAIL_BACKEND = f"{__name__}.BouncingBackend"


@pytest.fixture
def make_user(db):
    def make(*, digest: str = UserProfile.Digest.NONE, notify: bool = True, staff: bool = False, **fields):
        n = next(_serial)
        fields.setdefault("username", f"user{n}")
        fields.setdefault("email", f"user{n}@example.org")
        user = get_user_model().objects.create_user(password="pw", is_staff=staff, **fields)
        UserProfile.objects.filter(user=user).update(digest_frequency=digest, notify_on_response=notify)
        return user

    return make


@pytest.fixture
def location(db):
    return Location.objects.create(name="Chapel", slug="chapel")


@pytest.fixture
def make_request(location):
    def make(*, approved: bool = True, **fields):
        fields.setdefault("content", f"Please pray for request {next(_serial)}")
        fields.setdefault("location", location)
        if approved:
            fields.setdefault("approved_at", timezone.now())
        created_at = fields.pop("created_at", None)
        request = PrayerRequest.objects.create(**fields)
        if created_at is not None:  # auto_now_add ignores a given value
            PrayerRequest.objects.filter(pk=request.pk).update(created_at=created_at)
            request.refresh_from_db()
        return request

    return make


@pytest.fixture
def api():
    return APIClient()


@pytest.fixture
def staff_api(make_user):
    client = APIClient()
    client.force_authenticate(make_user(staff=True, username="moderator"))
    return client
