"""The prayer room API: a Django project whose web, worker and beat run through prodserver."""

from .celery import app as celery_app

__all__ = ("celery_app",)
