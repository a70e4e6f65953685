"""Settings shared by every environment; each value comes from the environment through `env`."""

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

PROJECT_DIR = Path(__file__).resolve().parents[2]  # project/
REPO_DIR = PROJECT_DIR.parent


env = environ.Env()


def _read_effective_env() -> None:
    """On a server, the programs and prayer-room-manage take every value the process was not given from the file
    PRAYER_ROOM_ENV_FILE names (the deploy kit renders it); a missing file stops the start, never a silent default."""
    path = os.environ.get("PRAYER_ROOM_ENV_FILE")
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as file:
            environ.Env.read_env(file)
    except OSError as exc:
        raise ImproperlyConfigured(
            f"PRAYER_ROOM_ENV_FILE: cannot read {path} ({exc.strerror}); run `fab deploy`."
        ) from None


_read_effective_env()


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer from the environment, or a message naming the variable to fix."""
    raw = env.str(name, default=str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, got {raw!r}.") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}.")
    return value


SECRET_KEY = env("SECRET_KEY", default="")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[])


def _release_from_revision_file() -> str:
    """The release id written by `fab deploy` next to the project, or "dev" for a checkout."""
    revision = REPO_DIR / "REVISION"
    return revision.read_text().strip() if revision.is_file() else "dev"


RELEASE = env("RELEASE", default="") or _release_from_revision_file()

INSTALLED_APPS = [
    # NOTE: first, so its `prodserver` command replaces django-prodserver's deprecated alias.
    "prayer_room_api",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served from here (no CDN)
    "django_celery_beat",
    "django_prodserver",
    "axes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files from the Django process (STATIC_ROOT, and the apps' folders when DEBUG): `invoke dev` has no
    # nginx; on servers nginx answers /static/ before a request gets here.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: it turns a locked-out login into the 429 answer.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "prayer_room_api.urls"
WSGI_APPLICATION = "prayer_room_api.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{REPO_DIR / 'var' / 'db.sqlite3'}")}
DATABASES["default"]["CONN_MAX_AGE"] = env_int("CONN_MAX_AGE", 60)
# A connection kept across requests is checked before its reuse: after PostgreSQL restarts (a security upgrade,
# the db host's reboot under `fab os-update`) no request or task fails on a dead one.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# django-axes first: it refuses a locked-out login before any password is checked.
AUTHENTICATION_BACKENDS = ["prayer_room_api.backends.AxesBackend", "prayer_room_api.backends.ModelBackend"]
# Brute-force protection of every login (the admin's): AXES_FAILURE_LIMIT wrong passwords for one username, from
# whatever addresses (one, or many: a guesser spread over addresses), lock that username out for AXES_COOLOFF_TIME
# hours (HTTP 429), from every address. Staff clear a lockout in the admin (Axes > Access attempts: delete) or with
# `manage.py axes_reset_username NAME`.
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = env_int("AXES_COOLOFF_HOURS", 1)
# The username alone counts every address's failures (the pair, also listed, counts no more than it does).
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"], "username"]
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False  # no "AXES: BEGIN" banner on every manage.py command; lockouts are still logged
AXES_CLIENT_IP_CALLABLE = "prayer_room_api.backends.client_ip"
AXES_USERNAME_CALLABLE = "prayer_room_api.backends.axes_username"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-gb"
TIME_ZONE = env("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = env.path("STATIC_ROOT", default=str(REPO_DIR / "var" / "static"))

# Email: console locally, SMTP (EMAIL_URL=smtp://user:pass@host:587/?tls=True) in production.
EMAIL_CONFIG = env.email_url("EMAIL_URL", default="consolemail://")
vars().update(EMAIL_CONFIG)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="Prayer room <prayer-room@localhost>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "prayer_room_api.api.schema.ErrorDocumentingAutoSchema",
    "DEFAULT_PARSER_CLASSES": [
        "prayer_room_api.api.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 20,
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "submit": env("THROTTLE_SUBMIT", default="10/hour"),
        "prayed": env("THROTTLE_PRAYED", default="60/hour"),
        "flag": env("THROTTLE_FLAG", default="20/hour"),
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Prayer room API",
    "VERSION": "1.0.0",
    # The schema endpoint is left out of the schema it serves.
    "SERVE_INCLUDE_SCHEMA": False,
    # Request bodies get components of their own: writable fields only, and minLength 1 where blank is refused.
    "COMPONENT_SPLIT_REQUEST": True,
    # The API docs at / load Swagger UI from drf-spectacular-sidecar's static files, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

CACHES = {"default": env.cache("CACHE_URL", default="locmemcache://")}
# Every Redis key and pub/sub channel of the app starts with this (broker, results, cache): the app's Redis ACL user
# (deploy/templates/provision/redis.conf.j2) may touch those only. The deploy kit's REDIS_KEY_PREFIX is the same.
REDIS_KEY_PREFIX = "prayer-room:"

# --- Celery (every CELERY_* setting is read by celery.py through the CELERY namespace) ---
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")


def broker_transport(url: str) -> str | None:
    """The project's Redis transport for a redis:// or rediss:// broker, else the one the URL names."""
    return "prayer_room_api.broker:Transport" if url.partition("://")[0] in ("redis", "rediss") else None


# kombu's own Redis transport loses a message a worker killed with -9 had taken off the queue but not yet recorded
# as unacknowledged (in 6 of 30 kills mid-batch); broker.py takes and records it in one step.
CELERY_BROKER_TRANSPORT = broker_transport(CELERY_BROKER_URL)
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=CELERY_BROKER_URL)
CELERY_RESULT_EXPIRES = 3600
# django-celery-beat reads crontab timezones from CELERY_TIMEZONE, not TIME_ZONE.
CELERY_TIMEZONE = TIME_ZONE
CELERY_ENABLE_UTC = True
# Every task is idempotent (each email is claimed in the database before it is sent), so a task is
# acknowledged only once it has run, and one whose worker or pool child was killed runs again.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A worker holds no more messages than it has pool processes: a kill -9 strands at most that many.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 300, minimum=1)
# The soft limit (SoftTimeLimitExceeded: a digest stops cleanly) comes first; by default at 4/5 of the hard one.
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", CELERY_TASK_TIME_LIMIT * 4 // 5)
if CELERY_TASK_SOFT_TIME_LIMIT > CELERY_TASK_TIME_LIMIT:
    # NOTE: Celery refuses to send any task then ("soft_time_limit must be less than or equal to time_limit").
    raise ImproperlyConfigured(
        f"CELERY_TASK_SOFT_TIME_LIMIT ({CELERY_TASK_SOFT_TIME_LIMIT}) must not exceed CELERY_TASK_TIME_LIMIT "
        f"({CELERY_TASK_TIME_LIMIT}); leave it unset for 4/5 of the hard limit."
    )
# A retry waits at most the hard limit (tasks.py), so a message is unacknowledged for at most a countdown
# plus a run: 2 limits. Redis hands a message held longer to another worker: the margin keeps a live
# worker's task from running twice, and a dead worker's tasks run again within ~2 limits + 35 s.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": 2 * CELERY_TASK_TIME_LIMIT + 30,
    # Look for expired messages every 5 s (kombu's default sweep is every 100 s).
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    # Queues, bindings, the unacked hash and its index and mutex, reply queues and fanout channels, under the prefix.
    "global_keyprefix": REDIS_KEY_PREFIX,
}
# Results (celery-task-meta-*) and the channels they are published on, under the prefix.
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"global_keyprefix": REDIS_KEY_PREFIX}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A request that sends a task while the broker is down waits ~2 s, not 4 s x 4 tries (the outbox sends it later).
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# DatabaseScheduler behind a PostgreSQL advisory lock: of any number of beats, one dispatches (beat.py).
CELERY_BEAT_SCHEDULER = "prayer_room_api.beat:LeaderDatabaseScheduler"
# Write last_run_at after every dispatch, so a killed beat does not re-run a crontab task.
CELERY_BEAT_SYNC_EVERY = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Processes, all started with `manage.py prodserver NAME` ---
PORT = env_int("PORT", 8000, minimum=1)
BIND_HOST = env("BIND_HOST", default="127.0.0.1")
WEB_WORKERS = env_int("WEB_WORKERS", 2, minimum=1)
WEB_TIMEOUT = env_int("WEB_TIMEOUT", 30, minimum=1)
WEB_GRACEFUL_TIMEOUT = env_int("WEB_GRACEFUL_TIMEOUT", 20)
WORKER_CONCURRENCY = env_int("WORKER_CONCURRENCY", 2, minimum=1)
LOG_LEVEL = env("LOG_LEVEL", default="info")
BEAT_MAX_INTERVAL = env_int("BEAT_MAX_INTERVAL", 5, minimum=1)

PRODUCTION_PROCESSES = {
    "web": {
        "BACKEND": "django_prodserver.backends.servers.gunicorn.GunicornServer",
        "ARGS": {
            "config": "python:prayer_room_api.gunicorn_conf",
            "bind": f"{BIND_HOST}:{PORT}",
            "workers": WEB_WORKERS,
            "timeout": WEB_TIMEOUT,
            "graceful-timeout": WEB_GRACEFUL_TIMEOUT,
            "log-level": LOG_LEVEL,
            "access-logfile": "-",
            "error-logfile": "-",
            # NOTE: gunicorn 25.1+ opens a control socket at ~/.gunicorn/gunicorn.ctl: two web programs would
            # share (and unlink) one path, and closing it adds ~2 s to every stop. Nothing here uses it.
            "no-control-socket": None,
        },
    },
    "worker": {
        "BACKEND": "django_prodserver.backends.workers.celery.CeleryWorker",
        "APP": "prayer_room_api.celery.app",
        "ARGS": {
            "concurrency": WORKER_CONCURRENCY,
            "loglevel": LOG_LEVEL,
            "without-mingle": None,
            "without-gossip": None,
            # On a cluster each worker host also consumes a queue of its own (host.<address>): the deploy's
            # ping goes there to check that host's workers.
            "queues": env("WORKER_QUEUES", default="celery"),
        },
    },
    "beat": {
        "BACKEND": "django_prodserver.backends.workers.celery.CeleryBeat",
        "APP": "prayer_room_api.celery.app",
        "ARGS": {
            "scheduler": CELERY_BEAT_SCHEDULER,
            "loglevel": LOG_LEVEL,
            "max-interval": BEAT_MAX_INTERVAL,
        },
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL.upper()},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
