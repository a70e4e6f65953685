"""Operational endpoints: the health check the deploy verifies; error pages, in JSON for the API."""

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views import defaults


def health(request):
    """200 with the release id when the database answers; 503 otherwise."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any database failure makes the release unhealthy
        return JsonResponse({"status": "error", "release": settings.RELEASE, "error": str(exc)}, status=503)
    return JsonResponse({"status": "ok", "release": settings.RELEASE})


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
