"""WSGI entry point, served by gunicorn through `manage.py prodserver web`."""

import codecs
import functools
import os

import django
from django.core.handlers import wsgi
from django.utils.http import parse_header_parameters

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "prayer_room_api.settings.local")


@functools.lru_cache(maxsize=64)
def decodes_text(charset: str) -> bool:
    """True when `charset` names a codec that turns any bytes into text, as Django's form decoding needs."""
    try:
        codecs.lookup(charset)
        bytes(range(256)).decode(charset, "replace")
    except (LookupError, UnicodeError):  # rot13, zlib, idna, punycode, undefined...
        return False
    return True


class WSGIRequest(wsgi.WSGIRequest):
    """Django's request, ignoring a Content-Type charset that cannot decode text, as it ignores an unknown one.

    NOTE: Django's `encoding` setter evaluates `hasattr(self, "GET")`, decoding the query string at once,
    so `Content-Type: text/plain; charset=rot13` with any query string raised before Django could answer.
    """

    def _set_content_type_params(self, meta):
        self.content_type, self.content_params = parse_header_parameters(meta.get("CONTENT_TYPE", ""))
        charset = self.content_params.get("charset")
        if charset and decodes_text(charset):
            self.encoding = charset


class WSGIHandler(wsgi.WSGIHandler):
    request_class = WSGIRequest


def get_wsgi_application() -> WSGIHandler:
    django.setup(set_prefix=False)
    return WSGIHandler()


application = get_wsgi_application()
