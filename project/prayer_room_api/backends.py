"""How users sign in: Django's model backend, safe for any username a client sends."""

from django.contrib.auth import backends


class ModelBackend(backends.ModelBackend):
    """Django's backend; a username with a NUL matches no user rather than reaching PostgreSQL, which refuses it."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is not None and "\x00" in str(username):
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)
