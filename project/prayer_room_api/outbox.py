"""Tasks the web starts survive a broker outage: saved in the same transaction, sent after commit, swept.

`enqueue_on_commit` writes an OutboxMessage inside the caller's transaction and, once it commits,
hands the task to the broker; a broker that cannot be reached is logged, not raised, so the request
still succeeds. The `send-outbox` schedule (schedules.py) sends again what is still pending: never
handed over, or handed over so long ago that the message must have been lost (a Redis restarted
without its data). The task marks its message done when it ran to its end. Delivery is therefore
at least once: every task sent this way must be idempotent (the response email is claimed in the
database before it is sent).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from .models import OutboxMessage

logger = logging.getLogger(__name__)

# The sweep leaves a message this young to its own on_commit send.
GRACE = timedelta(seconds=30)
# A message handed over this long ago and not done was lost (the broker redelivers a live one sooner).
MAX_ENQUEUES = 5
KEEP_DONE = timedelta(days=7)


def resend_after() -> timedelta:
    """Twice the broker's visibility timeout: a message held by a dead worker has run again by then."""
    return timedelta(seconds=2 * settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout", 3600))


def enqueue_on_commit(task: str, *args) -> OutboxMessage:
    """Record `task(*args)` in the current transaction; hand it to the broker once the transaction commits."""
    message = OutboxMessage.objects.create(task=task, args=list(args))
    transaction.on_commit(lambda: send(message))
    return message


def send(message: OutboxMessage) -> bool:
    """Hand one message to the broker (with its id, so the task marks it done); False, logged, when it fails."""
    from . import tasks  # noqa: F401 - registered, so the eager test settings run them in-process
    from .celery import app

    try:
        # NOTE: ignore_result: the web waits for no result, and subscribing to one (redis backend) while Redis
        # is down retries for 20 s, then leaves the process's result consumer broken for good.
        app.signature(message.task, args=message.args, kwargs={"outbox_id": message.pk}).apply_async(ignore_result=True)
    except Exception as exc:  # noqa: BLE001 - a broker outage must not fail the request; the sweep resends
        logger.warning(
            "outbox: %s(%s) not handed to the broker (%s: %s); the send-outbox sweep will retry",
            message.task,
            ", ".join(map(str, message.args)),
            type(exc).__name__,
            exc,
        )
        return False
    OutboxMessage.objects.filter(pk=message.pk).update(enqueued_at=timezone.now(), enqueue_count=F("enqueue_count") + 1)
    return True


def mark_done(outbox_id: int | None) -> None:
    """Called by a task sent through the outbox when it ran to its end."""
    if outbox_id is not None:
        OutboxMessage.objects.filter(pk=outbox_id, done_at__isnull=True).update(done_at=timezone.now())


def send_pending(now=None, limit: int = 500) -> dict:
    """Hand the broker every message still pending; forget done ones after KEEP_DONE."""
    now = now or timezone.now()
    pending = (
        OutboxMessage.objects.filter(done_at__isnull=True, created_at__lte=now - GRACE)
        .filter(Q(enqueued_at__isnull=True) | Q(enqueued_at__lte=now - resend_after()))
        .order_by("created_at")
    )
    due = list(pending.filter(enqueue_count__lt=MAX_ENQUEUES)[:limit])
    sent = sum(send(message) for message in due)
    given_up = pending.filter(enqueue_count__gte=MAX_ENQUEUES).count()
    if given_up:
        logger.error("outbox: %s messages were sent %s times and never finished; see the admin", given_up, MAX_ENQUEUES)
    OutboxMessage.objects.filter(done_at__lt=now - KEEP_DONE).delete()
    return {"sent": sent, "failed": len(due) - sent, "given_up": given_up}
