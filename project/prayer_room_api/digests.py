"""Who gets which digest email, claimed per user and period so a repeated run sends nothing twice.

Each run costs a fixed number of queries whatever the number of recipients (the recipients, a
prefetch of their requests, a takeover of stale claims, a bulk insert of claims, a read of the
claims won), plus one update per email sent: each is recorded as sent the moment it has gone.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import EmailMultiAlternatives, get_connection
from django.db.models import Count, Exists, F, Max, OuterRef, Prefetch, Q, Subquery, Value
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from . import emails
from .models import DigestDelivery, Prayer, PrayerRequest, UserProfile

logger = logging.getLogger(__name__)

Kind = DigestDelivery.Kind
USER_DIGEST_KINDS = (Kind.DAILY, Kind.WEEKLY)
PERIOD_LENGTH = {Kind.MODERATOR: timedelta(hours=1), Kind.DAILY: timedelta(days=1), Kind.WEEKLY: timedelta(weeks=1)}
MODERATOR_LIST_LIMIT = 50


class DigestNotSent(Exception):
    """Some digest emails failed; their claims were released so a retry sends them."""


@dataclass
class DigestRun:
    """What one run did: the users emailed, and those skipped because another run had claimed them."""

    kind: str
    period_start: datetime
    sent: list[str] = field(default_factory=list)
    already_claimed: int = 0

    def summary(self) -> dict:
        return {
            "kind": str(self.kind),
            "period_start": self.period_start.isoformat(),
            "sent": len(self.sent),
            "already_claimed": self.already_claimed,
        }


def period_start(kind: str, now: datetime) -> datetime:
    """The start of the hour, day or week (Monday) containing `now`, in the beat's timezone."""
    local = timezone.localtime(now, ZoneInfo(settings.CELERY_TIMEZONE))
    start = local.replace(minute=0, second=0, microsecond=0)
    if kind != Kind.MODERATOR:
        start = start.replace(hour=0)
    if kind == Kind.WEEKLY:
        start -= timedelta(days=start.weekday())
    return start


def _last_sent(kind_filter: Q, user_ref: str = "pk") -> Subquery:
    """The time up to which the user's last sent digest of these kinds reported."""
    return Subquery(
        DigestDelivery.objects.filter(kind_filter, user=OuterRef(user_ref), sent_at__isnull=False)
        .order_by("-covered_until")
        .values("covered_until")[:1]
    )


def stale_before(now: datetime) -> datetime:
    """Claims older than the hard time limit and still unsent belong to a run that died: the next run takes them."""
    return now - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT)


def _not_claimed(kind: str, period: datetime, now: datetime) -> Exists:
    live = Q(sent_at__isnull=False) | Q(covered_until__gte=stale_before(now))
    return ~Exists(DigestDelivery.objects.filter(live, user=OuterRef("pk"), kind=kind, period_start=period))


def send_claimed(
    run: DigestRun, messages: dict[int, EmailMultiAlternatives], now: datetime, period: datetime
) -> DigestRun:
    """Claim a delivery per user, send the won ones over one connection, recording each as it is sent.

    A run killed at any point and run again sends each user's digest once: what was sent is
    recorded, and the dead run's unsent claims go stale after the hard time limit and are taken
    over (only a kill between the mail server accepting a message and its record, a window of
    one UPDATE, can send one twice). A failed email, a failed connection or the soft time limit
    releases the unsent claims and raises DigestNotSent, so the task's retry sends only those.
    """
    if not messages:
        return run
    claim = uuid.uuid4()
    # NOTE: one UPDATE takes a dead run's claims over atomically: of two runs, the second finds them fresh.
    DigestDelivery.objects.filter(
        kind=run.kind,
        period_start=period,
        user_id__in=list(messages),
        sent_at__isnull=True,
        covered_until__lt=stale_before(now),
    ).update(claim=claim, covered_until=now)
    DigestDelivery.objects.bulk_create(
        [
            DigestDelivery(user_id=user_id, kind=run.kind, period_start=period, covered_until=now, claim=claim)
            for user_id in messages
        ],
        ignore_conflicts=True,
    )
    won = set(DigestDelivery.objects.filter(claim=claim).values_list("user_id", flat=True))
    run.already_claimed = len(messages) - len(won)
    sent_ids = []
    stopped_by = None
    try:
        with get_connection() as connection:
            for user_id in sorted(won):
                message = messages[user_id]
                message.connection = connection
                try:
                    message.send()
                except SoftTimeLimitExceeded:
                    raise
                except Exception:  # noqa: BLE001 - one refused address must not stop the others
                    logger.exception("%s digest to user %s failed", run.kind, user_id)
                    continue
                DigestDelivery.objects.filter(claim=claim, user_id=user_id).update(sent_at=timezone.now())
                sent_ids.append(user_id)
                run.sent.extend(message.to)
    except SoftTimeLimitExceeded as exc:
        logger.warning("%s digest: soft time limit after %s of %s emails; a retry sends the rest", run.kind,
                       len(sent_ids), len(won))  # fmt: skip
        stopped_by = exc
    except Exception as exc:  # noqa: BLE001 - opening or closing the connection failed; released below
        logger.exception("%s digest: mail connection failed", run.kind)
        stopped_by = exc
    unsent = sorted(won.difference(sent_ids))
    if unsent:
        DigestDelivery.objects.filter(claim=claim, user_id__in=unsent).delete()
        raise DigestNotSent(
            f"{run.kind} digest not sent to {len(unsent)} of {len(won)} users: {unsent}"
        ) from stopped_by
    return run


def send_user_digests(kind: str, now: datetime | None = None) -> DigestRun:
    """Email each opted-in user the responses and new prayers on their requests since their last digest."""
    if kind not in USER_DIGEST_KINDS:
        raise ValueError(f"unknown digest frequency {kind!r}; expected one of {[str(k) for k in USER_DIGEST_KINDS]}")
    now = now or timezone.now()
    period = period_start(kind, now)
    run = DigestRun(kind=kind, period_start=period)
    first_since = now - PERIOD_LENGTH[kind]
    user_kinds = Q(kind__in=USER_DIGEST_KINDS)

    new_prayers = (
        Prayer.objects.filter(request=OuterRef("pk"), created_at__gt=OuterRef("since"), created_at__lte=now)
        .order_by()
        .values("request")
        .annotate(n=Count("pk"))
        .values("n")
    )
    activity = (
        PrayerRequest.objects.annotate(since=Coalesce(_last_sent(user_kinds, "author_id"), Value(first_since)))
        .annotate(new_prayers=Coalesce(Subquery(new_prayers), 0))
        .filter(Q(responded_at__gt=F("since"), responded_at__lte=now) | Q(new_prayers__gt=0))
        .select_related("location")
        .order_by("-created_at")
    )
    users = (
        get_user_model()
        .objects.filter(is_active=True, profile__digest_frequency=kind)
        .exclude(email="")
        .filter(_not_claimed(kind, period, now))
        .annotate(since=Coalesce(_last_sent(user_kinds), Value(first_since)))
        .prefetch_related(Prefetch("prayer_requests", queryset=activity, to_attr="digest_requests"))
        .order_by("pk")
    )
    messages = {
        user.pk: emails.user_digest(user, user.digest_requests, kind=kind, since=user.since, until=now)
        for user in users
        if user.digest_requests
    }
    return send_claimed(run, messages, now, period)


def send_moderator_digest(now: datetime | None = None) -> DigestRun:
    """Email staff the pending and flagged requests, if anything is new since their last moderator digest."""
    now = now or timezone.now()
    period = period_start(Kind.MODERATOR, now)
    run = DigestRun(kind=Kind.MODERATOR, period_start=period)

    waiting = PrayerRequest.objects.filter(Q(approved_at__isnull=True) | Q(flagged_at__isnull=False)).filter(
        archived_at__isnull=True
    )
    latest = waiting.aggregate(
        latest=Max(Greatest("created_at", Coalesce("flagged_at", "created_at"))),
        pending=Count("pk", filter=Q(approved_at__isnull=True, flagged_at__isnull=True)),
        flagged=Count("pk", filter=Q(flagged_at__isnull=False)),
    )
    if latest["latest"] is None:
        return run
    staff = (
        get_user_model()
        .objects.filter(is_active=True, is_staff=True)
        .exclude(email="")
        .filter(_not_claimed(Kind.MODERATOR, period, now))
        .annotate(since=_last_sent(Q(kind=Kind.MODERATOR)))
        .order_by("pk")
    )
    due = [user for user in staff if user.since is None or user.since < latest["latest"]]
    if not due:
        return run
    pending = list(
        PrayerRequest.objects.pending()
        .filter(flagged_at__isnull=True)
        .select_related("location")
        .order_by("created_at")[:MODERATOR_LIST_LIMIT]
    )
    flagged = list(
        PrayerRequest.objects.flagged().select_related("location").order_by("flagged_at")[:MODERATOR_LIST_LIMIT]
    )
    messages = {
        user.pk: emails.moderator_digest(
            user, pending, flagged, pending_total=latest["pending"], flagged_total=latest["flagged"], since=user.since
        )
        for user in due
    }
    return send_claimed(run, messages, now, period)


def send_response_notification(request_id: int) -> bool:
    """Email the author the staff response once per response, if they want such emails; True when sent."""
    request = PrayerRequest.objects.select_related("author", "location").filter(pk=request_id).first()
    if request is None or not request.response or request.responded_at is None:
        return False
    author = request.author
    if author is None or not author.is_active or not author.email:
        return False
    if not UserProfile.objects.for_user(author).notify_on_response:
        return False
    previous = request.response_notified_at
    claimed_at = timezone.now()
    claimed = (
        PrayerRequest.objects.filter(pk=request.pk, responded_at=request.responded_at)
        .filter(Q(response_notified_at__isnull=True) | Q(response_notified_at__lt=F("responded_at")))
        .update(response_notified_at=claimed_at)
    )
    if not claimed:
        return False
    try:
        with get_connection() as connection:
            message = emails.response_notification(request)
            message.connection = connection
            message.send()
    except Exception:
        PrayerRequest.objects.filter(pk=request.pk, response_notified_at=claimed_at).update(
            response_notified_at=previous
        )
        raise
    return True
