import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.core import mail
from django.utils import timezone

from prayer_room_api import digests, tasks
from prayer_room_api.models import DigestDelivery, Prayer, PrayerRequest
from tests.support.concurrency import run_in_threads

pytestmark = pytest.mark.django_db

# A Monday, 08:00 UTC (the test settings' CELERY_TIMEZONE), when both user digests run.
MONDAY_8AM = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
HOUR, DAY = timedelta(hours=1), timedelta(days=1)


def pray(request: PrayerRequest, at: datetime, times: int = 1) -> None:
    PrayerRequest.objects.filter(pk=request.pk).update(prayer_count=request.prayer_count + times)
    Prayer.objects.bulk_create([Prayer(request=request, created_at=at) for _ in range(times)])
    request.refresh_from_db()


def respond(request: PrayerRequest, text: str, at: datetime) -> None:
    PrayerRequest.objects.filter(pk=request.pk).update(response=text, responded_at=at)


def html_of(message) -> str:
    [(html, mimetype)] = message.alternatives
    assert mimetype == "text/html"
    return html


# --- periods ---


@pytest.mark.parametrize(
    "kind, now, start",
    [
        ("moderator", datetime(2026, 11, 4, 13, 59, 59, tzinfo=UTC), datetime(2026, 11, 4, 13, tzinfo=UTC)),
        ("daily", datetime(2026, 11, 4, 0, 0, 1, tzinfo=UTC), datetime(2026, 11, 4, tzinfo=UTC)),
        ("weekly", datetime(2026, 11, 8, 23, 59, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),
        ("weekly", datetime(2026, 11, 2, 8, 0, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),
    ],
)
def test_period_start(kind, now, start):
    assert digests.period_start(kind, now) == start


def test_periods_follow_the_beat_timezone(settings):
    settings.CELERY_TIMEZONE = "Europe/London"  # BST: UTC+1 in summer
    start = digests.period_start("daily", datetime(2026, 7, 1, 23, 30, tzinfo=UTC))
    assert start == datetime(2026, 7, 1, 23, 0, tzinfo=UTC)


# --- user digests ---


def test_user_digest_reports_responses_and_new_prayers_on_own_requests(make_user, make_request):
    ann = make_user(email="ann@example.org", first_name="Ann", digest="daily")
    bob = make_user(email="bob@example.org", digest="daily")
    answered = make_request(author=ann, content="Healing for my <b>aunt</b>")
    prayed_for = make_request(author=ann, content="A new job")
    quiet = make_request(author=ann, content="Nothing happened here")
    respond(answered, "We are praying with you.", MONDAY_8AM - 2 * HOUR)
    pray(prayed_for, MONDAY_8AM - 3 * HOUR, times=3)
    pray(quiet, MONDAY_8AM - 3 * DAY)  # before the first digest's day
    make_request(author=make_user(digest="daily", email="carol@example.org"))  # nothing new for carol

    run = digests.send_user_digests("daily", now=MONDAY_8AM)

    assert run.sent == ["ann@example.org"]
    [message] = mail.outbox
    assert message.to == ["ann@example.org"]
    assert message.subject == "Your daily prayer room digest"
    assert "Hello Ann," in message.body
    assert "Healing for my <b>aunt</b>" in message.body
    assert "Response: We are praying with you." in message.body
    assert "People prayed for your requests 3 times" in message.body
    assert '"A new job": 3 new, 3 in all' in message.body
    assert "Nothing happened here" not in message.body
    html = html_of(message)
    assert "Healing for my &lt;b&gt;aunt&lt;/b&gt;" in html and "<b>aunt</b>" not in html
    assert "We are praying with you." in html
    assert bob.email not in {to for m in mail.outbox for to in m.to}


def test_user_digest_goes_only_to_users_of_that_frequency(make_user, make_request):
    users = {kind: make_user(digest=kind, email=f"{kind}@example.org") for kind in ("none", "daily", "weekly")}
    for user in users.values():
        pray(make_request(author=user), MONDAY_8AM - HOUR)

    digests.send_user_digests("weekly", now=MONDAY_8AM)
    digests.send_user_digests("daily", now=MONDAY_8AM)

    assert [m.to for m in mail.outbox] == [["weekly@example.org"], ["daily@example.org"]]
    assert mail.outbox[0].subject == "Your weekly prayer room digest"


def test_inactive_users_and_users_without_email_get_no_digest(make_user, make_request):
    for user in (make_user(digest="daily", is_active=False), make_user(digest="daily", email="")):
        pray(make_request(author=user), MONDAY_8AM - HOUR)
    assert digests.send_user_digests("daily", now=MONDAY_8AM).sent == []
    assert mail.outbox == []


def test_user_digest_twice_in_a_period_sends_once(make_user, make_request):
    ann = make_user(digest="daily")
    pray(make_request(author=ann), timezone.now() - timedelta(minutes=1))

    first = tasks.send_user_digest.delay("daily").get()  # the task as beat calls it, at the real time
    second = tasks.send_user_digest.delay("daily").get()

    assert (first["sent"], second["sent"]) == (1, 0)
    assert len(mail.outbox) == 1
    delivery = DigestDelivery.objects.get()
    assert (delivery.user, delivery.kind, delivery.sent_at is not None) == (ann, "daily", True)


def test_the_next_digest_reports_only_what_is_new_since_the_last(make_user, make_request):
    ann = make_user(digest="daily")
    request = make_request(author=ann, content="Strength")
    pray(request, MONDAY_8AM - HOUR, times=2)
    digests.send_user_digests("daily", now=MONDAY_8AM)
    pray(request, MONDAY_8AM + HOUR)
    respond(request, "Keep going", MONDAY_8AM + 2 * HOUR)

    digests.send_user_digests("daily", now=MONDAY_8AM + DAY)

    first, second = mail.outbox
    assert '"Strength": 2 new, 2 in all' in first.body and "Response" not in first.body
    assert '"Strength": 1 new, 3 in all' in second.body
    assert "Response: Keep going" in second.body


def test_a_quiet_day_sends_nothing_and_the_next_digest_covers_it(make_user, make_request):
    ann = make_user(digest="daily")
    request = make_request(author=ann)
    pray(request, MONDAY_8AM - HOUR)
    digests.send_user_digests("daily", now=MONDAY_8AM)
    assert digests.send_user_digests("daily", now=MONDAY_8AM + DAY).sent == []
    pray(request, MONDAY_8AM + DAY + HOUR)  # after the quiet day
    pray(request, MONDAY_8AM + HOUR)  # during the quiet day, counted late rather than never
    digests.send_user_digests("daily", now=MONDAY_8AM + 2 * DAY)
    assert len(mail.outbox) == 2
    assert "2 new, 3 in all" in mail.outbox[1].body


def test_switching_from_weekly_to_daily_does_not_repeat_news(make_user, make_request):
    ann = make_user(digest="weekly")
    request = make_request(author=ann)
    pray(request, MONDAY_8AM - HOUR)
    digests.send_user_digests("weekly", now=MONDAY_8AM)
    ann.profile.digest_frequency = "daily"
    ann.profile.save()
    assert digests.send_user_digests("daily", now=MONDAY_8AM + DAY).sent == []
    assert len(mail.outbox) == 1


def test_a_claim_by_a_concurrent_run_wins(make_user):
    ann, bob = make_user(), make_user()
    period = digests.period_start("daily", MONDAY_8AM)
    DigestDelivery.objects.create(
        user=ann, kind="daily", period_start=period, covered_until=MONDAY_8AM, claim=uuid.uuid4()
    )
    messages = {user.pk: mail.EmailMessage("digest", "text", to=[user.email]) for user in (ann, bob)}

    run = digests.send_claimed(digests.DigestRun("daily", period), messages, MONDAY_8AM, period)

    assert (run.sent, run.already_claimed) == ([bob.email], 1)
    assert [m.to for m in mail.outbox] == [[bob.email]]


def test_a_refused_email_releases_its_claim_so_a_retry_sends_only_it(make_user, make_request, bouncing_email, settings):
    ok = make_user(digest="daily", email="ok@example.org")
    bouncing = make_user(digest="daily", email="bounce@example.org")
    for user in (ok, bouncing):
        pray(make_request(author=user), MONDAY_8AM - HOUR)

    with pytest.raises(digests.DigestNotSent, match="not sent to 1 of 2"):
        digests.send_user_digests("daily", now=MONDAY_8AM)
    assert [m.to for m in mail.outbox] == [["ok@example.org"]]
    assert list(DigestDelivery.objects.values_list("user__email", flat=True)) == ["ok@example.org"]

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"  # the address works again
    digests.send_user_digests("daily", now=MONDAY_8AM + timedelta(minutes=5))
    assert [m.to for m in mail.outbox] == [["ok@example.org"], ["bounce@example.org"]]


def test_an_unreachable_mail_server_releases_every_claim(make_user, make_request, unreachable_email, settings):
    pray(make_request(author=make_user(digest="daily")), MONDAY_8AM - HOUR)
    with pytest.raises(digests.DigestNotSent, match="not sent to 1 of 1"):
        digests.send_user_digests("daily", now=MONDAY_8AM)
    assert not DigestDelivery.objects.exists()
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert len(digests.send_user_digests("daily", now=MONDAY_8AM).sent) == 1


def test_a_digest_run_opens_one_connection(make_user, make_request, counted_connections):
    for _ in range(5):
        pray(make_request(author=make_user(digest="daily")), MONDAY_8AM - HOUR)
    digests.send_user_digests("daily", now=MONDAY_8AM)
    assert len(mail.outbox) == 5
    assert counted_connections.opened == 1


def test_an_unknown_frequency_is_refused(db):
    with pytest.raises(ValueError, match="hourly"):
        tasks.send_user_digest("hourly")


# --- moderator digest ---


def test_moderator_digest_lists_pending_and_flagged_to_staff(make_user, make_request):
    make_user(staff=True, email="mod@example.org", first_name="Mo")
    make_user(staff=True, email="")
    make_user(email="user@example.org")
    make_request(approved=False, content="Waiting one", created_at=MONDAY_8AM - 2 * HOUR)
    make_request(approved=False, content="Waiting two", created_at=MONDAY_8AM - HOUR)
    make_request(content="Rude words", flagged_at=MONDAY_8AM - HOUR, created_at=MONDAY_8AM - DAY)
    make_request(content="Fine and approved", created_at=MONDAY_8AM - HOUR)
    make_request(approved=False, content="Archived", archived_at=MONDAY_8AM, created_at=MONDAY_8AM - HOUR)

    run = digests.send_moderator_digest(now=MONDAY_8AM)

    assert run.sent == ["mod@example.org"]
    [message] = mail.outbox
    assert message.subject == "Prayer room moderation: 2 pending, 1 flagged"
    assert "Hello Mo," in message.body
    body = message.body
    assert body.index("Flagged:") < body.index("Rude words") < body.index("Pending:")
    assert body.index("Waiting one") < body.index("Waiting two")
    assert "Fine and approved" not in body and "Archived" not in body
    assert "Waiting two" in html_of(message)


def test_moderator_digest_is_skipped_when_nothing_is_new(make_user, make_request):
    make_user(staff=True, email="mod@example.org")
    make_request(approved=False, created_at=MONDAY_8AM - HOUR)

    assert len(digests.send_moderator_digest(now=MONDAY_8AM).sent) == 1
    assert digests.send_moderator_digest(now=MONDAY_8AM + timedelta(minutes=1)).sent == []  # same hour
    assert digests.send_moderator_digest(now=MONDAY_8AM + HOUR).sent == []  # nothing new
    make_request(approved=False, content="Arrived later", created_at=MONDAY_8AM + HOUR + timedelta(minutes=10))
    assert len(digests.send_moderator_digest(now=MONDAY_8AM + 2 * HOUR).sent) == 1

    assert len(mail.outbox) == 2
    assert "Arrived later" in mail.outbox[1].body and "NEW" in mail.outbox[1].body


def test_a_new_flag_on_an_old_request_is_news(make_user, make_request):
    make_user(staff=True)
    request = make_request(created_at=MONDAY_8AM - 3 * DAY)
    make_request(approved=False, created_at=MONDAY_8AM - HOUR)
    digests.send_moderator_digest(now=MONDAY_8AM)
    PrayerRequest.objects.filter(pk=request.pk).update(flagged_at=MONDAY_8AM + timedelta(minutes=30))
    assert len(digests.send_moderator_digest(now=MONDAY_8AM + HOUR).sent) == 1
    assert "1 flagged" in mail.outbox[1].subject


def test_no_moderator_digest_without_pending_or_flagged_requests(make_user, make_request):
    make_user(staff=True)
    make_request()
    summary = tasks.send_moderator_digest.delay().get()
    assert (summary["kind"], summary["sent"]) == ("moderator", 0)
    assert type(summary["kind"]) is str  # plain JSON for the result backend
    assert mail.outbox == []


def test_a_new_staff_member_gets_the_current_digest(make_user, make_request):
    make_user(staff=True, email="first@example.org")
    make_request(approved=False, created_at=MONDAY_8AM - HOUR)
    digests.send_moderator_digest(now=MONDAY_8AM)
    make_user(staff=True, email="second@example.org")
    assert digests.send_moderator_digest(now=MONDAY_8AM + HOUR).sent == ["second@example.org"]


def test_the_moderator_digest_caps_its_lists(make_user, make_request, settings):
    make_user(staff=True)
    for n in range(digests.MODERATOR_LIST_LIMIT + 2):
        make_request(approved=False, content=f"Waiting {n}", created_at=MONDAY_8AM - HOUR)
    digests.send_moderator_digest(now=MONDAY_8AM)
    assert "... and 2 more" in mail.outbox[0].body


# --- response notifications ---


def test_response_notification_goes_to_an_opted_in_author_once(make_user, make_request, counted_connections):
    author = make_user(email="ann@example.org")
    request = make_request(author=author, content="Peace at home")
    respond(request, "We prayed tonight.", MONDAY_8AM)

    assert tasks.send_response_notification.delay(request.pk).get() is True
    assert tasks.send_response_notification.delay(request.pk).get() is False  # a retry or duplicate

    [message] = mail.outbox
    assert message.to == ["ann@example.org"]
    assert message.subject == "A response to your prayer request"
    assert "We prayed tonight." in message.body and "Peace at home" in message.body
    assert "We prayed tonight." in html_of(message)
    assert counted_connections.opened == 1


def test_a_new_response_is_notified_again(make_user, make_request):
    request = make_request(author=make_user())
    respond(request, "First", MONDAY_8AM)
    digests.send_response_notification(request.pk)
    request.refresh_from_db()
    respond(request, "Second", request.response_notified_at + HOUR)
    assert digests.send_response_notification(request.pk) is True
    assert [m.body.count("Second") for m in mail.outbox] == [0, 1]


def test_no_notification_when_opted_out_anonymous_or_unanswered(make_user, make_request):
    opted_out = make_request(author=make_user(notify=False))
    anonymous = make_request()
    unanswered = make_request(author=make_user())
    for request in (opted_out, anonymous):
        respond(request, "Response", MONDAY_8AM)
    for request in (opted_out, anonymous, unanswered):
        assert digests.send_response_notification(request.pk) is False
    assert digests.send_response_notification(987654) is False
    assert mail.outbox == []


def test_a_failed_notification_can_be_retried(make_user, make_request, bouncing_email, settings):
    request = make_request(author=make_user(email="bounce@example.org"))
    respond(request, "Response", MONDAY_8AM)
    with pytest.raises(OSError):
        digests.send_response_notification(request.pk)
    request.refresh_from_db()
    assert request.response_notified_at is None
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert digests.send_response_notification(request.pk) is True
    assert len(mail.outbox) == 1


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_concurrent_runs_send_each_digest_once(make_user, make_request):
    users = [make_user(digest="daily") for _ in range(10)]
    for user in users:
        pray(make_request(author=user), MONDAY_8AM - HOUR)
    results = []
    errors = run_in_threads(lambda: results.append(digests.send_user_digests("daily", now=MONDAY_8AM)), 4)

    assert errors == []
    assert sorted(to for m in mail.outbox for to in m.to) == sorted(u.email for u in users)
    assert sum(len(r.sent) for r in results) == 10
    assert DigestDelivery.objects.filter(sent_at__isnull=False).count() == 10


def test_every_scheduled_task_name_is_a_registered_task():
    from prayer_room_api.celery import app
    from prayer_room_api.schedules import SCHEDULES

    app.loader.import_default_modules()
    assert {schedule.task for schedule in SCHEDULES} <= set(app.tasks)
    assert "prayer_room_api.tasks.send_response_notification" in app.tasks
