"""How users sign in: Django's model backend, safe for any username a client sends; the client address axes counts."""

from axes.backends import AxesStandaloneBackend
from django.conf import settings
from django.contrib.auth import backends


class ModelBackend(backends.ModelBackend):
    """Django's backend; a username with a NUL matches no user rather than reaching PostgreSQL, which refuses it."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is not None and "\x00" in str(username):
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)


class AxesBackend(AxesStandaloneBackend):
    """django-axes' lockout check for every login that comes with a request (the admin's, the API's).

    NOTE: axes refuses an authenticate() without a request (AxesBackendRequestParameterRequired); here such a
    call (Django's test client login, a management command) has no address to count and passes to the next
    backend. No HTTP request reaches authenticate() without one.
    """

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)


def axes_username(request, credentials=None) -> str | None:
    """The username axes counts failures for, without NULs (PostgreSQL refuses them; such a name matches no user)."""
    field = settings.AXES_USERNAME_FORM_FIELD
    name = credentials.get(field) if credentials else request.POST.get(field) if request is not None else None
    return None if name is None else str(name).replace("\x00", "")


def client_ip(request) -> str | None:
    """The client's address: the one the nearest of NUM_PROXIES proxies saw (nginx appends it), else REMOTE_ADDR.

    The same address DRF's throttles key on; a client cannot choose it by sending X-Forwarded-For itself.
    """
    proxies = settings.REST_FRAMEWORK.get("NUM_PROXIES") or 0
    forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
    if proxies and forwarded:
        return forwarded[-min(proxies, len(forwarded))]
    return request.META.get("REMOTE_ADDR")
