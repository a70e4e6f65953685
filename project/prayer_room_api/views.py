"""Operational endpoints: the health check the deploy verifies."""

from django.conf import settings
from django.db import connection
from django.http import JsonResponse


def health(request):
    """200 with the release id when the database answers; 503 otherwise."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any database failure makes the release unhealthy
        return JsonResponse({"status": "error", "release": settings.RELEASE, "error": str(exc)}, status=503)
    return JsonResponse({"status": "ok", "release": settings.RELEASE})
