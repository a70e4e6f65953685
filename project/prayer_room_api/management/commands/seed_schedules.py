"""`manage.py seed_schedules [--check]`: make the declared schedules exist; report drift."""

from django.core.management import BaseCommand, CommandError

from prayer_room_api import schedules


class Command(BaseCommand):
    help = "Create missing periodic tasks without overwriting staff edits; --check reports drift."

    def add_arguments(self, parser):
        parser.add_argument(
            "--check", action="store_true", help="Change nothing; exit 1 when a declared schedule is missing."
        )

    def handle(self, *args, check=False, **options):
        if not check:
            created = schedules.seed()
            for name in created:
                self.stdout.write(f"created: {name}")
            self.stdout.write(
                self.style.SUCCESS(f"{len(created)} created, {len(schedules.SCHEDULES) - len(created)} already present")
            )
            return
        report = schedules.drift()
        for line in report.lines():
            self.stdout.write(line)
        if report.missing:
            raise CommandError(
                f"{len(report.missing)} declared schedule(s) missing: {', '.join(report.missing)}. "
                "Run `manage.py seed_schedules` to create them."
            )
        self.stdout.write(
            self.style.SUCCESS("schedules: no drift" if report.clean else "schedules: all declared present")
        )
