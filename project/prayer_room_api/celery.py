"""The Celery app: configured from Django's CELERY_* settings, schedules in the database."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "prayer_room_api.settings.local")

app = Celery("prayer_room_api")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
