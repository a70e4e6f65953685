"""Celery tasks; periodic schedules point at these names from the database."""

import socket
import time

from celery import shared_task
from django.conf import settings

from . import digests, outbox

# A failed email releases its claim and fails the run; a retry sends only what is still unsent.
# NOTE: a retry's countdown is spent unacknowledged in the worker; capped at the hard limit, it stays
# inside the broker's visibility timeout (settings), so Redis never hands a waiting retry to a second worker.
BACKOFF = {"retry_backoff": 60, "retry_backoff_max": min(600, settings.CELERY_TASK_TIME_LIMIT), "max_retries": 3}
RETRY = {"autoretry_for": (digests.DigestNotSent,), **BACKOFF}


@shared_task(name="prayer_room_api.tasks.ping")
def ping(seconds: float = 0) -> dict:
    """Answer with this worker's release, so a deploy can check the new code runs tasks.

    `seconds` (at most 60) keeps the worker busy first: the fault tests kill workers with tasks in hand.
    """
    time.sleep(min(max(float(seconds), 0.0), 60.0))
    return {"release": settings.RELEASE, "hostname": socket.gethostname()}


@shared_task(name="prayer_room_api.tasks.send_moderator_digest", **RETRY)
def send_moderator_digest() -> dict:
    """Email staff the pending and flagged requests when anything is new since their last digest."""
    return digests.send_moderator_digest().summary()


@shared_task(name="prayer_room_api.tasks.send_user_digest", **RETRY)
def send_user_digest(frequency: str) -> dict:
    """Email users who chose this frequency ("daily" or "weekly") what happened on their requests."""
    return digests.send_user_digests(frequency).summary()


@shared_task(
    name="prayer_room_api.tasks.send_response_notification",
    autoretry_for=(OSError,),
    **BACKOFF,
)
def send_response_notification(request_id: int, outbox_id: int | None = None) -> bool:
    """Email the author of a request the staff response, once, if they opted in."""
    sent = digests.send_response_notification(request_id)
    outbox.mark_done(outbox_id)
    return sent


@shared_task(name="prayer_room_api.tasks.send_outbox")
def send_outbox() -> dict:
    """Hand the broker what the web saved but could not send (a broker outage), or what the broker lost."""
    return outbox.send_pending()
