"""Local development: SQLite and a filesystem broker, so nothing needs to be installed."""

from pathlib import Path

from .base import *  # noqa: F403
from .base import REPO_DIR, broker_transport, env

DEBUG = env.bool("DEBUG", default=True)
SECRET_KEY = env("SECRET_KEY", default="local-development-only-not-secret")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

VAR_DIR = Path(env("VAR_DIR", default=str(REPO_DIR / "var")))
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
STATIC_ROOT = env.path("STATIC_ROOT", default=str(VAR_DIR / "static"))
_broker_dir = VAR_DIR / "celery" / "broker"
# NOTE: kombu's filesystem transport needs its folders to exist before the first message.
for _folder in (
    _broker_dir / "out",
    _broker_dir / "processed",
    _broker_dir / "control",
    VAR_DIR / "celery" / "results",
):
    _folder.mkdir(parents=True, exist_ok=True)

CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
CELERY_BROKER_TRANSPORT = broker_transport(CELERY_BROKER_URL)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "data_folder_in": str(_broker_dir / "out"),
    "data_folder_out": str(_broker_dir / "out"),
    "processed_folder": str(_broker_dir / "processed"),
    "control_folder": str(_broker_dir / "control"),
    "store_processed": False,
}
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=f"file://{VAR_DIR / 'celery' / 'results'}")
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {}  # the key prefix is Redis's (base.py); result files keep their names

EMAIL_CONFIG = env.email_url("EMAIL_URL", default="consolemail://")
vars().update(EMAIL_CONFIG)
