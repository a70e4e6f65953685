"""A digest run stopped at any point (soft time limit, a killed worker) and run again sends each user once."""

from datetime import UTC, datetime, timedelta

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.core import mail
from django.core.mail.backends.locmem import EmailBackend

from prayer_room_api import digests
from prayer_room_api.models import DigestDelivery, Prayer

pytestmark = pytest.mark.django_db

MONDAY_8AM = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


class Killed(BaseException):
    """Stands for the process dying mid-run: nothing after it runs (as SIGKILL would allow)."""


class StopsAtThird(EmailBackend):
    """Delivers two messages, then raises `stop` (set by the test) on the third."""

    stop: type[BaseException] = SoftTimeLimitExceeded

    def send_messages(self, messages):
        if len(mail.outbox) == 2:
            raise self.stop()
        return super().send_messages(messages)


@pytest.fixture
def five_users(make_user, make_request):
    users = [make_user(digest="daily") for _ in range(5)]
    for user in users:
        Prayer.objects.create(request=make_request(author=user), created_at=MONDAY_8AM - timedelta(hours=1))
    return users


def sent_to() -> list[str]:
    return sorted(address for message in mail.outbox for address in message.to)


def test_the_soft_time_limit_stops_the_run_and_a_retry_sends_only_the_rest(five_users, settings):
    settings.EMAIL_BACKEND = f"{__name__}.StopsAtThird"
    StopsAtThird.stop = SoftTimeLimitExceeded
    with pytest.raises(digests.DigestNotSent, match="not sent to 3 of 5") as raised:
        digests.send_user_digests("daily", now=MONDAY_8AM)
    assert isinstance(raised.value.__cause__, SoftTimeLimitExceeded), "the soft limit is not swallowed"
    assert DigestDelivery.objects.filter(sent_at__isnull=False).count() == 2
    assert DigestDelivery.objects.count() == 2, "the unsent claims were released"

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert len(digests.send_user_digests("daily", now=MONDAY_8AM + timedelta(minutes=1)).sent) == 3
    assert sent_to() == sorted(u.email for u in five_users)


def test_a_run_killed_midway_and_run_again_sends_each_user_once(five_users, settings):
    settings.EMAIL_BACKEND = f"{__name__}.StopsAtThird"
    StopsAtThird.stop = Killed
    with pytest.raises(Killed):
        digests.send_user_digests("daily", now=MONDAY_8AM)
    assert DigestDelivery.objects.filter(sent_at__isnull=False).count() == 2, "each email recorded as it went"
    assert DigestDelivery.objects.filter(sent_at__isnull=True).count() == 3, "the dead run's claims are left"

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    soon = MONDAY_8AM + timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT // 2)
    assert digests.send_user_digests("daily", now=soon).sent == [], "a claim younger than the hard limit may be live"
    later = MONDAY_8AM + timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 1)
    assert len(digests.send_user_digests("daily", now=later).sent) == 3
    assert sent_to() == sorted(u.email for u in five_users)
    assert DigestDelivery.objects.filter(sent_at__isnull=True).count() == 0
    assert digests.send_user_digests("daily", now=later + timedelta(hours=1)).sent == []
