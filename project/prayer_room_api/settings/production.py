"""Production: every secret and address from the environment; secure behind a TLS proxy."""

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import DATABASES, REDIS_KEY_PREFIX, REPO_DIR, REST_FRAMEWORK, env, env_int

SECRET_KEY = env("SECRET_KEY", default="")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "SECRET_KEY is not set. Put SECRET_KEY=<50+ random characters> in the environment "
        "(on a server: the shared env file `fab provision` writes)."
    )
DEBUG = False
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[])
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS is not set. Put ALLOWED_HOSTS=example.org in the environment.")

if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured(
        "DATABASE_URL must point at PostgreSQL in production, e.g. postgres://user@127.0.0.1:5432/prayer_room."
    )

# Rate limits count in a cache every web worker shares; the in-memory default would split them.
CACHES = {"default": env.cache("CACHE_URL", default="redis://127.0.0.1:6379/1")}
if CACHES["default"]["BACKEND"].endswith("LocMemCache"):
    raise ImproperlyConfigured(
        "CACHE_URL must be shared by all web workers in production, e.g. redis://127.0.0.1:6379/1."
    )
if not CACHES["default"]["BACKEND"].endswith("RedisCache"):
    raise ImproperlyConfigured(
        "CACHE_URL must be a Redis URL in production (redis://... or rediss://...): the cache entries are stored as "
        "JSON there, and Django's other cache backends pickle them."
    )
# Entries in JSON, never pickled: a written cache key cannot run code in the app (prayer_room_api/cache.py).
CACHES["default"]["BACKEND"] = "prayer_room_api.cache.JSONRedisCache"
# Version 2 since the entries are JSON: a release from before (pickle, version 1) and this one never read each
# other's entries, in a rolling restart or after a rollback (pickle.loads of a JSON entry raises: a 500).
CACHES["default"]["VERSION"] = 2
# A cache that does not answer in a second counts as down (rate limits then fail open), not a hung request.
CACHES["default"].setdefault("OPTIONS", {}).update(socket_connect_timeout=1, socket_timeout=1)
# Keys "prayer-room:cache:2:<key>": under the prefix the app's Redis ACL user is limited to.
CACHES["default"].setdefault("KEY_PREFIX", f"{REDIS_KEY_PREFIX}cache")
# Rate limits (and axes' login lockouts) key on the client address nginx passes in X-Forwarded-For (one proxy in
# front; on a cluster's web host too: its nginx takes the balancer's forwarded address as the client's and appends it
# again, so 1 is right there as well, and 2 would believe a client that reaches a web host directly).
# No HTTP Basic auth: a password on every request, unthrottled, over whatever the transport is; the API's
# staff use the session of their admin login.
REST_FRAMEWORK = {
    **REST_FRAMEWORK,
    "NUM_PROXIES": env_int("NUM_PROXIES", 1),
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
}

CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# The TLS-terminating proxy (nginx) sets X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
SESSION_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# Static files: content-hashed names (staticfiles.json maps them), so they can be cached for good.
# STATIC_ROOT=release (what deploy sets): each release collects its own beside its code, releases/<id>/static,
# which nginx serves; a rolling restart or a rollback then serves the assets the page was rendered with.
if env("STATIC_ROOT", default="") == "release":
    STATIC_ROOT = REPO_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"},
}

EMAIL_CONFIG = env.email_url("EMAIL_URL", default="smtp://127.0.0.1:25")
vars().update(EMAIL_CONFIG)
