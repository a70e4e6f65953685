"""`manage.py prodserver NAME`: start web, worker or beat, whatever kind of backend NAME has."""

import sys

from django.core.management import CommandError
from django.utils.module_loading import import_string
from django_prodserver.backends.base import BaseProcessBackend
from django_prodserver.conf import app_settings
from django_prodserver.management.base import BaseProcessCommand

from prayer_room_api.processes import run_backend


class Command(BaseProcessCommand):
    help = "Start a process configured in PRODUCTION_PROCESSES (web, worker, beat)."
    process_label = "process"
    backend_base_class = BaseProcessBackend

    def start_process(self, process_name, *args, **kwargs):
        """Start the named process and exit with its exit code."""
        backend = self.build_backend(process_name)
        self.stdout.write(self.style.NOTICE(f"Starting process named {process_name}"))
        self.stdout.flush()
        code = run_backend(backend)
        if code:
            self.stderr.write(f"Process '{process_name}' exited with code {code}.")
        sys.exit(code)

    def build_backend(self, process_name: str) -> BaseProcessBackend:
        """The configured backend for `process_name`, with a message naming the setting to fix."""
        config = app_settings.PRODUCTION_PROCESSES.get(process_name)
        if config is None:
            names = ", ".join(app_settings.PRODUCTION_PROCESSES)
            raise CommandError(f"No process named '{process_name}' in PRODUCTION_PROCESSES; configured: {names}.")
        if "BACKEND" not in config:
            raise CommandError(f"PRODUCTION_PROCESSES['{process_name}'] has no BACKEND; set its dotted path.")
        try:
            backend_class = import_string(config["BACKEND"])
        except ImportError as exc:
            raise CommandError(
                f"PRODUCTION_PROCESSES['{process_name}'] BACKEND '{config['BACKEND']}' cannot be imported: {exc}"
            ) from exc
        return backend_class(**config)

    def list_process_names(self) -> None:
        names = "\n ".join(app_settings.PRODUCTION_PROCESSES)
        self.stdout.write(self.style.SUCCESS(f"Available process names are:\n {names}"))
