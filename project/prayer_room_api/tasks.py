"""Celery tasks; periodic schedules point at these names from the database."""

import socket

from celery import shared_task
from django.conf import settings


@shared_task(name="prayer_room_api.tasks.ping")
def ping() -> dict:
    """Answer with this worker's release, so a deploy can check the new code runs tasks."""
    return {"release": settings.RELEASE, "hostname": socket.gethostname()}
