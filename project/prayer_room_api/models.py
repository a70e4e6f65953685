"""The prayer room's data: locations, prayer and praise requests, user preferences, digest bookkeeping."""

from __future__ import annotations

from django.conf import settings
from django.db import models, transaction
from django.db.models import F, Q
from django.db.models.signals import post_save
from django.dispatch import receiver
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
        """Visible to the public: approved, not archived, not flagged since (approving again clears a flag)."""
        return self.filter(approved_at__isnull=False, archived_at__isnull=True, flagged_at__isnull=True)

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
    response_notified_at = models.DateTimeField(
        null=True, blank=True, help_text="When the author was last emailed about the response."
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
        """Make the request public: clears a flag and restores an archived request."""
        self.approved_at, self.flagged_at, self.archived_at = timezone.now(), None, None

    def archive(self) -> None:
        self.archived_at = timezone.now()

    def respond(self, response: str, by) -> None:
        self.response, self.responded_at, self.responded_by = response, timezone.now(), by

    def record_prayer(self) -> int:
        """Count one "I prayed for this" atomically and return the new total."""
        with transaction.atomic():
            PrayerRequest.objects.filter(pk=self.pk).update(prayer_count=F("prayer_count") + 1)
            Prayer.objects.create(request=self)
        self.refresh_from_db(fields=["prayer_count"])
        return self.prayer_count

    def flag(self) -> None:
        """Mark the request for moderation; the first flag's time is kept."""
        PrayerRequest.objects.filter(pk=self.pk, flagged_at__isnull=True).update(flagged_at=timezone.now())
        self.refresh_from_db(fields=["flagged_at"])


class Prayer(models.Model):
    """One "I prayed for this"; user digests count these since the author's last digest."""

    request = models.ForeignKey(PrayerRequest, on_delete=models.CASCADE, related_name="prayers")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["request", "created_at"])]

    def __str__(self) -> str:
        return f"Prayer for #{self.request_id} at {self.created_at:%Y-%m-%d %H:%M}"


class UserProfileQuerySet(models.QuerySet):
    def for_user(self, user) -> UserProfile:
        """The user's profile, created with the defaults if the user has none yet."""
        profile, _ = self.get_or_create(user=user)
        return profile


class UserProfile(models.Model):
    class Digest(models.TextChoices):
        NONE = "none", "No digest"
        DAILY = "daily", "Daily"
        WEEKLY = "weekly", "Weekly"

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    digest_frequency = models.CharField(max_length=10, choices=Digest.choices, default=Digest.NONE)
    notify_on_response = models.BooleanField(default=True)

    objects = UserProfileQuerySet.as_manager()

    def __str__(self) -> str:
        return f"Preferences of {self.user}"


@receiver(post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="prayer_room_api.create_user_profile")
def create_user_profile(sender, instance, created, raw=False, **kwargs) -> None:
    """Every new user gets a profile with the default preferences."""
    if created and not raw:
        UserProfile.objects.get_or_create(user=instance)


class DigestDelivery(models.Model):
    """One digest email for one user and period, claimed before it is sent so it never goes out twice."""

    class Kind(models.TextChoices):
        MODERATOR = "moderator", "Moderator digest"
        DAILY = "daily", "Daily digest"
        WEEKLY = "weekly", "Weekly digest"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="digest_deliveries")
    kind = models.CharField(max_length=10, choices=Kind.choices)
    period_start = models.DateTimeField(help_text="Start of the hour, day or week this digest is for.")
    covered_until = models.DateTimeField(help_text="The digest reports what happened up to this time.")
    claim = models.UUIDField(help_text="The task run that claimed this delivery.")
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "kind", "period_start"], name="one_digest_per_user_and_period")
        ]
        indexes = [
            models.Index(
                fields=["kind", "user", "covered_until"], condition=Q(sent_at__isnull=False), name="sent_digest_idx"
            )
        ]
        verbose_name_plural = "digest deliveries"

    def __str__(self) -> str:
        return f"{self.get_kind_display()} for {self.user} ({self.period_start:%Y-%m-%d %H:%M})"


class OutboxMessage(models.Model):
    """A task the web started, saved with the change that caused it and sent to the broker after commit (outbox.py)."""

    task = models.CharField(max_length=200)
    args = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    enqueued_at = models.DateTimeField(null=True, blank=True, help_text="Last handed to the broker.")
    enqueue_count = models.PositiveSmallIntegerField(default=0)
    done_at = models.DateTimeField(null=True, blank=True, help_text="When the task ran to its end.")

    class Meta:
        indexes = [models.Index(fields=["created_at"], condition=Q(done_at__isnull=True), name="outbox_pending_idx")]

    def __str__(self) -> str:
        return f"{self.task}{tuple(self.args)} ({'done' if self.done_at else 'pending'})"
