"""Start a process named in PRODUCTION_PROCESSES with the django-prodserver command that owns it."""

from __future__ import annotations

import click
from celery.bin.celery import celery as celery_cli
from django_prodserver.backends.base import BaseProcessBackend
from django_prodserver.backends.workers.celery import CeleryBeat, CeleryWorker


def run_backend(backend: BaseProcessBackend) -> int:
    """Run the backend in the foreground and return its exit code."""
    args = backend.prep_server_args()
    if isinstance(backend, CeleryWorker):
        subcommand = "beat" if isinstance(backend, CeleryBeat) else "worker"
        return run_celery(backend.app, [subcommand, *args])
    backend.start_server(*args)
    return 0


def run_celery(app, argv: list[str]) -> int:
    """Run `celery ARGV` for `app`, keeping the exit code that `Celery.start()` drops.

    NOTE: django-prodserver 3.0 calls `app.start()`, which discards click's exit code, so a
    worker that fails to start would exit 0; this keeps it.
    """
    celery_cli.params[0].default = app
    try:
        code = celery_cli.main(args=argv, prog_name="celery", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 1
    finally:
        celery_cli.params[0].default = None
    return code if isinstance(code, int) else 0
