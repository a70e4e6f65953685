"""With the cache or the broker unreachable the API still answers; /health/ names what is down; the outbox."""

import logging
from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from prayer_room_api import outbox
from prayer_room_api.celery import app
from prayer_room_api.models import OutboxMessage

pytestmark = pytest.mark.django_db

UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens on port 1
RESPOND = "prayer_room_api.tasks.send_response_notification"


@pytest.fixture
def cache_down(settings):
    settings.CACHES = {
        "default": {
            "BACKEND": "prayer_room_api.cache.JSONRedisCache",
            "LOCATION": UNREACHABLE,
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }


@pytest.fixture
def broker_down():
    saved = app.conf.broker_url
    app.conf.broker_url = UNREACHABLE
    yield
    app.conf.broker_url = saved


def test_throttled_endpoints_fail_open_with_a_warning_while_the_cache_is_down(api, make_request, cache_down, caplog):
    caplog.set_level(logging.WARNING)
    submitted = api.post("/api/requests/", {"content": "x", "location": "chapel"}, format="json")
    assert submitted.status_code == 201
    assert api.post(f"/api/requests/{make_request().pk}/prayed/").status_code == 200
    assert api.post(f"/api/requests/{make_request().pk}/flag/").status_code == 200
    assert "rate limit 'submit' not applied: the cache is unreachable" in caplog.text


def test_health_names_each_service(client):
    response = client.get("/health/")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "cache": "ok", "broker": "ok"}


@pytest.mark.parametrize("down", ["cache", "broker"])
def test_health_is_503_naming_the_service_down_without_its_error(client, request, down, caplog):
    request.getfixturevalue(f"{down}_down")
    response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "error" and body["checks"][down] == "unavailable"
    assert [name for name, state in body["checks"].items() if state != "ok"] == [down]
    assert set(body) == {"status", "release", "checks"}, "no exception text in a public answer"
    assert f"health: {down} unavailable" in caplog.text


def test_respond_records_the_email_in_the_outbox_and_marks_it_done(
    staff_api, make_request, make_user, django_capture_on_commit_callbacks
):
    request = make_request(author=make_user(email="ann@example.org"))
    with django_capture_on_commit_callbacks(execute=True):
        assert (
            staff_api.post(f"/api/moderation/requests/{request.pk}/respond/", {"response": "Amen"}).status_code == 200
        )
    (message,) = OutboxMessage.objects.all()
    assert (message.task, message.args, message.enqueue_count) == (RESPOND, [request.pk], 1)
    assert message.done_at is not None
    assert len(mail.outbox) == 1


def test_the_sweep_sends_what_the_broker_never_got_once(make_request, make_user):
    request = make_request(author=make_user(email="ann@example.org"), response="Amen", responded_at=timezone.now())
    message = OutboxMessage.objects.create(task=RESPOND, args=[request.pk])  # as left by a failed send
    assert outbox.send_pending() == {"sent": 0, "failed": 0, "given_up": 0}, "too young: its own send may be running"

    later = timezone.now() + outbox.GRACE + timedelta(seconds=1)
    assert outbox.send_pending(now=later)["sent"] == 1
    assert [m.to for m in mail.outbox] == [["ann@example.org"]]
    message.refresh_from_db()
    assert message.done_at is not None
    assert outbox.send_pending(now=later + outbox.resend_after() * 2)["sent"] == 0
    assert len(mail.outbox) == 1


def test_a_message_the_broker_lost_is_sent_again_and_the_email_still_goes_once(make_request, make_user):
    request = make_request(author=make_user(email="ann@example.org"), response="Amen", responded_at=timezone.now())
    outbox.send(OutboxMessage.objects.create(task=RESPOND, args=[request.pk]))
    OutboxMessage.objects.update(done_at=None)  # as if the worker never reported back
    later = timezone.now() + outbox.resend_after() + timedelta(seconds=1)
    assert outbox.send_pending(now=later)["sent"] == 1
    assert len(mail.outbox) == 1, "the email's own claim keeps it to one"
    assert OutboxMessage.objects.get().enqueue_count == 2


def test_a_message_that_never_finishes_is_given_up_after_max_enqueues(caplog):
    OutboxMessage.objects.create(task=RESPOND, args=[0], enqueue_count=outbox.MAX_ENQUEUES)
    later = timezone.now() + outbox.resend_after() + timedelta(seconds=1)
    assert outbox.send_pending(now=later) == {"sent": 0, "failed": 0, "given_up": 1}
    assert "never finished" in caplog.text


def test_a_send_that_fails_is_logged_not_raised(broker_down, caplog):
    app.conf.task_always_eager = False
    try:
        message = OutboxMessage.objects.create(task="prayer_room_api.tasks.ping", args=[])
        assert outbox.send(message) is False
    finally:
        app.conf.task_always_eager = True
    message.refresh_from_db()
    assert (message.enqueued_at, message.enqueue_count) == (None, 0)
    assert "not handed to the broker" in caplog.text
