"""A digest run costs a fixed number of SQL queries, plus the one UPDATE that records each email as sent."""

from datetime import UTC, datetime, timedelta

import pytest
from django.core import mail
from django.db import connection
from django.test.utils import CaptureQueriesContext

from prayer_room_api import digests
from prayer_room_api.models import Prayer, PrayerRequest

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


def user_digest_queries(make_user, make_request, users: int) -> int:
    for n in range(users):
        author = make_user(digest="weekly")
        for _ in range(2):
            request = make_request(author=author, response=f"Response {n}", responded_at=NOW - timedelta(hours=1))
            PrayerRequest.objects.filter(pk=request.pk).update(prayer_count=2)
            Prayer.objects.bulk_create([Prayer(request=request, created_at=NOW - timedelta(hours=2))] * 2)
    mail.outbox.clear()
    with CaptureQueriesContext(connection) as queries:
        run = digests.send_user_digests("weekly", now=NOW)
    assert len(run.sent) == users == len(mail.outbox)
    return len(queries) - users


def moderator_digest_queries(make_user, make_request, staff: int) -> int:
    for _ in range(staff):
        make_user(staff=True)
    for n in range(staff):
        make_request(approved=False, created_at=NOW - timedelta(minutes=n + 1))
        make_request(flagged_at=NOW - timedelta(minutes=n + 1), created_at=NOW - timedelta(days=1))
    with CaptureQueriesContext(connection) as queries:
        run = digests.send_moderator_digest(now=NOW + timedelta(minutes=5))
    assert len(run.sent) == staff == len(mail.outbox)
    return len(queries) - staff


def test_user_digest_queries_beyond_one_per_email_do_not_grow_with_users(make_user, make_request):
    few = user_digest_queries(make_user, make_request, 5)
    PrayerRequest.objects.all().delete()
    many = user_digest_queries(make_user, make_request, 50)
    assert few == many
    assert many <= 8


def test_moderator_digest_queries_beyond_one_per_email_do_not_grow_with_staff(make_user, make_request):
    few = moderator_digest_queries(make_user, make_request, 5)
    mail.outbox.clear()
    PrayerRequest.objects.all().delete()
    many = moderator_digest_queries(make_user, make_request, 50)
    assert few == many
    assert many <= 10


def test_user_digest_run_stays_within_its_query_budget(make_user, make_request, django_assert_max_num_queries):
    for _ in range(30):
        request = make_request(author=make_user(digest="daily"))
        Prayer.objects.create(request=request, created_at=NOW - timedelta(hours=1))
    with django_assert_max_num_queries(8 + 30):
        digests.send_user_digests("daily", now=NOW)
    assert len(mail.outbox) == 30
