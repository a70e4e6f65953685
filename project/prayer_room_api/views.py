"""Operational endpoints: the health check the deploy verifies; error pages, in JSON for the API."""

import logging

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import JsonResponse
from django.views import defaults

logger = logging.getLogger(__name__)


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _cache() -> None:
    cache.get("health-check")


def _broker() -> None:
    from .celery import app

    # NOTE: a pooled connection says nothing of the server until it is used: a round trip each time.
    with app.connection_for_write(connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        if conn.transport.driver_type == "redis":
            conn.default_channel.client.ping()


CHECKS = {"database": _database, "cache": _cache, "broker": _broker}


def health(request):
    """200 with the release when the database, the cache and the broker answer; 503 naming those that do not.

    What went wrong goes to the log, never into the answer: the page is public.
    """
    checks = {}
    for name, check in CHECKS.items():
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - any failure of a service makes the release unhealthy
            logger.warning("health: %s unavailable: %s: %s", name, type(exc).__name__, exc)
            checks[name] = "unavailable"
        else:
            checks[name] = "ok"
    healthy = all(state == "ok" for state in checks.values())
    body = {"status": "ok" if healthy else "error", "release": settings.RELEASE, "checks": checks}
    return JsonResponse(body, status=200 if healthy else 503)


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def bad_request(request, exception):
    """A 400 raised before DRF (e.g. a body over DATA_UPLOAD_MAX_MEMORY_SIZE): JSON under /api/."""
    if _is_api(request):
        return JsonResponse({"detail": "Bad request."}, status=400)
    return defaults.bad_request(request, exception)


def not_found(request, exception):
    """No URL matched (e.g. /api/requests/abc/): JSON under /api/, as DRF's own 404s are."""
    if _is_api(request):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)
