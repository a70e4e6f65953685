"""`manage.py demo_data`: locations, approved and pending requests and a staff account to try the site with."""

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from prayer_room_api.models import Location, PrayerRequest

LOCATIONS = {"chapel": "Chapel", "prayer-room": "Prayer room"}
REQUESTS = [
    # (location, type, name, content, approved)
    ("chapel", "prayer", "Anna", "Please pray for my mother's recovery after her operation.", True),
    ("chapel", "praise", "Ben", "Thank you for the new job after months of searching!", True),
    ("prayer-room", "prayer", "Anonymous", "For peace in our family this Christmas.", True),
    ("prayer-room", "prayer", "Chris", "Strength for the exams next week.", False),
    ("chapel", "prayer", "Anonymous", "For everyone travelling home this weekend.", False),
]
STAFF_USERNAME = "demo-staff"


class Command(BaseCommand):
    help = "Load demo data (locations, approved and pending requests, a staff account); for local development."

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true", help="Load it even though DEBUG is off.")
        parser.add_argument(
            "--if-empty", action="store_true", help="Only into a database without locations (what `invoke dev` runs)."
        )

    def handle(self, *args, force=False, if_empty=False, **options):
        if not settings.DEBUG and not force:
            raise CommandError("demo_data is for a local database (DEBUG on); pass --force to load it anyway.")
        if if_empty and Location.objects.exists():
            return
        with transaction.atomic():
            locations = {
                slug: Location.objects.get_or_create(slug=slug, defaults={"name": name})[0]
                for slug, name in LOCATIONS.items()
            }
            created = 0
            for slug, kind, name, content, approved in REQUESTS:
                _, new = PrayerRequest.objects.get_or_create(
                    content=content,
                    defaults={
                        "location": locations[slug],
                        "type": kind,
                        "name": name,
                        "approved_at": timezone.now() if approved else None,
                    },
                )
                created += new
            password = self._staff_password()
        pending = PrayerRequest.objects.pending().count()
        self.stdout.write(
            self.style.SUCCESS(
                f"demo data: {len(locations)} locations, {created} new requests "
                f"({PrayerRequest.objects.approved().count()} approved, {pending} pending moderation)"
            )
        )
        if password:
            self.stdout.write(f"staff sign-in at /admin/: user {STAFF_USERNAME}, password {password}")
        else:
            self.stdout.write(
                f"staff sign-in at /admin/: user {STAFF_USERNAME} (its password was printed when it was made; "
                f"set a new one with `manage.py changepassword {STAFF_USERNAME}`)"
            )

    def _staff_password(self) -> str | None:
        """A new password when the demo staff account is made now, else None."""
        users = get_user_model().objects
        if users.filter(username=STAFF_USERNAME).exists():
            return None
        password = secrets.token_urlsafe(9)
        users.create_superuser(STAFF_USERNAME, f"{STAFF_USERNAME}@example.org", password)
        return password
