"""The prayer room's data: locations, prayer and praise requests, user preferences."""

from django.conf import settings
from django.db import models
from django.utils import timezone


class Location(models.Model):
    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True)
    is_active = models.BooleanField(default=True, help_text="Inactive locations take no new requests.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class PrayerRequestQuerySet(models.QuerySet):
    def approved(self):
        """Visible to the public: approved, not archived."""
        return self.filter(approved_at__isnull=False, archived_at__isnull=True)

    def pending(self):
        """Waiting for a moderator: neither approved nor archived."""
        return self.filter(approved_at__isnull=True, archived_at__isnull=True)

    def flagged(self):
        return self.filter(flagged_at__isnull=False, archived_at__isnull=True)


class PrayerRequest(models.Model):
    class Type(models.TextChoices):
        PRAYER = "prayer", "Prayer"
        PRAISE = "praise", "Praise"

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        FLAGGED = "flagged", "Flagged"
        ARCHIVED = "archived", "Archived"

    content = models.TextField(max_length=2000)
    name = models.CharField(max_length=100, default="Anonymous", blank=True)
    type = models.CharField(max_length=10, choices=Type.choices, default=Type.PRAYER)
    location = models.ForeignKey(Location, on_delete=models.PROTECT, related_name="requests")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="prayer_requests"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    prayer_count = models.PositiveIntegerField(default=0)
    approved_at = models.DateTimeField(null=True, blank=True)
    flagged_at = models.DateTimeField(null=True, blank=True)
    archived_at = models.DateTimeField(null=True, blank=True)
    response = models.TextField(blank=True, help_text="A staff response, shown with the request.")
    responded_at = models.DateTimeField(null=True, blank=True)
    responded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = PrayerRequestQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["approved_at", "archived_at"])]

    def __str__(self) -> str:
        return f"{self.get_type_display()} #{self.pk}: {self.content[:40]}"

    @property
    def state(self) -> str:
        if self.archived_at:
            return self.State.ARCHIVED
        if self.flagged_at:
            return self.State.FLAGGED
        if self.approved_at:
            return self.State.APPROVED
        return self.State.PENDING

    def approve(self) -> None:
        self.approved_at, self.flagged_at = timezone.now(), None

    def archive(self) -> None:
        self.archived_at = timezone.now()


class UserProfile(models.Model):
    class Digest(models.TextChoices):
        NONE = "none", "No digest"
        DAILY = "daily", "Daily"
        WEEKLY = "weekly", "Weekly"

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    digest_frequency = models.CharField(max_length=10, choices=Digest.choices, default=Digest.NONE)
    notify_on_response = models.BooleanField(default=True)

    def __str__(self) -> str:
        return f"Preferences of {self.user}"
