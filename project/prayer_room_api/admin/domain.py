"""Admin screens for the prayer room's data, with moderation actions on requests."""

from django.contrib import admin, messages
from django.utils import timezone

from prayer_room_api import outbox
from prayer_room_api.models import DigestDelivery, Location, Prayer, PrayerRequest, UserProfile


@admin.register(Location)
class LocationAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "is_active", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return PrayerRequest.State.choices

    def queryset(self, request, queryset):
        state = self.value()
        if state == PrayerRequest.State.PENDING:
            return queryset.pending().filter(flagged_at__isnull=True)
        if state == PrayerRequest.State.FLAGGED:
            return queryset.flagged()
        if state == PrayerRequest.State.APPROVED:
            return queryset.approved().filter(flagged_at__isnull=True)
        if state == PrayerRequest.State.ARCHIVED:
            return queryset.filter(archived_at__isnull=False)
        return queryset


class RespondedFilter(admin.SimpleListFilter):
    title = "response"
    parameter_name = "responded"

    def lookups(self, request, model_admin):
        return [("yes", "Responded"), ("no", "Not responded")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.exclude(response="")
        if self.value() == "no":
            return queryset.filter(response="")
        return queryset


@admin.register(PrayerRequest)
class PrayerRequestAdmin(admin.ModelAdmin):
    list_display = ["id", "summary", "type", "location", "name", "author", "state", "prayer_count", "created_at"]
    list_filter = [StateFilter, "type", "location", RespondedFilter, "created_at"]
    search_fields = ["content", "name", "response", "author__username", "author__email"]
    list_select_related = ["location", "author"]
    date_hierarchy = "created_at"
    autocomplete_fields = ["author"]
    readonly_fields = [
        "prayer_count",
        "created_at",
        "updated_at",
        "approved_at",
        "flagged_at",
        "archived_at",
        "responded_at",
        "responded_by",
        "response_notified_at",
    ]
    actions = ["approve", "archive"]

    @admin.display(description="content")
    def summary(self, obj: PrayerRequest) -> str:
        return obj.content[:80]

    @admin.display(description="state")
    def state(self, obj: PrayerRequest) -> str:
        return PrayerRequest.State(obj.state).label

    @admin.action(description="Approve the selected requests (clears flags)")
    def approve(self, request, queryset):
        updated = queryset.update(approved_at=timezone.now(), flagged_at=None, archived_at=None)
        self.message_user(request, f"Approved {updated} request(s).", messages.SUCCESS)

    @admin.action(description="Archive the selected requests")
    def archive(self, request, queryset):
        updated = queryset.filter(archived_at__isnull=True).update(archived_at=timezone.now())
        self.message_user(request, f"Archived {updated} request(s).", messages.SUCCESS)

    def save_model(self, request, obj, form, change):
        """A new or changed response is stamped and emailed to the author, as from the API."""
        responded = "response" in form.changed_data and obj.response
        if responded:
            obj.respond(obj.response, by=request.user)
        super().save_model(request, obj, form, change)
        if responded:  # the admin's change view runs in a transaction: the email is saved with the response
            outbox.enqueue_on_commit("prayer_room_api.tasks.send_response_notification", obj.pk)


@admin.register(Prayer)
class PrayerAdmin(admin.ModelAdmin):
    list_display = ["id", "request", "created_at"]
    list_filter = ["created_at"]
    search_fields = ["request__content"]
    list_select_related = ["request"]
    raw_id_fields = ["request"]
    date_hierarchy = "created_at"


@admin.register(UserProfile)
class UserProfileAdmin(admin.ModelAdmin):
    list_display = ["user", "digest_frequency", "notify_on_response"]
    list_filter = ["digest_frequency", "notify_on_response"]
    search_fields = ["user__username", "user__email"]
    list_select_related = ["user"]
    autocomplete_fields = ["user"]


class SentFilter(admin.SimpleListFilter):
    title = "sent"
    parameter_name = "sent"

    def lookups(self, request, model_admin):
        return [("yes", "Sent"), ("no", "Claimed, not sent")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(sent_at__isnull=self.value() == "no")
        return queryset


@admin.register(DigestDelivery)
class DigestDeliveryAdmin(admin.ModelAdmin):
    list_display = ["user", "kind", "period_start", "covered_until", "sent_at"]
    list_filter = ["kind", SentFilter, "period_start"]
    search_fields = ["user__username", "user__email"]
    list_select_related = ["user"]
    date_hierarchy = "period_start"
    readonly_fields = ["user", "kind", "period_start", "covered_until", "claim", "sent_at"]

    def has_add_permission(self, request):
        return False
