"""What the API reads and writes: public requests, submissions, moderation, a user's preferences."""

import re

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from prayer_room_api.models import Location, PrayerRequest, UserProfile


class StrictCharField(serializers.CharField):
    """A CharField that takes only strings: DRF's would store a JSON number or float as its text."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field({"type": "string", "pattern": "^[-a-zA-Z0-9_]+$", "maxLength": 100})
class LocationSlugField(serializers.SlugRelatedField):
    """A location named by its slug; text that is not a slug is refused before it reaches the database.

    NOTE: PostgreSQL raises on a NUL in a query parameter, so "a\x00b" would otherwise be a 500.
    """

    def to_internal_value(self, data):
        if not isinstance(data, str) or not re.fullmatch(r"[-a-zA-Z0-9_]+", data):
            raise serializers.ValidationError(serializers.SlugField.default_error_messages["invalid"])
        return super().to_internal_value(data)


class LocationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Location
        fields = ["slug", "name"]


class PrayerRequestSerializer(serializers.ModelSerializer):
    """A request as the public sees it: no author, no moderation details."""

    location = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    location_name = serializers.CharField(source="location.name", read_only=True)

    class Meta:
        model = PrayerRequest
        fields = [
            "id",
            "type",
            "content",
            "name",
            "location",
            "location_name",
            "prayer_count",
            "response",
            "responded_at",
            "created_at",
        ]
        read_only_fields = fields


class RequestFilterSerializer(serializers.Serializer):
    """The list's query parameters; anything else in them is ignored."""

    type = serializers.ChoiceField(choices=PrayerRequest.Type.choices, required=False)
    location = serializers.SlugField(max_length=100, required=False, help_text="A location's slug.")


class SubmitRequestSerializer(serializers.ModelSerializer):
    """A new request from the public; it waits for a moderator before anyone sees it."""

    location = LocationSlugField(slug_field="slug", queryset=Location.objects.all())
    content = StrictCharField(max_length=2000)
    name = StrictCharField(max_length=100, required=False, allow_blank=True, help_text="Anonymous if left out.")

    class Meta:
        model = PrayerRequest
        fields = ["id", "type", "content", "name", "location", "created_at"]
        read_only_fields = ["id", "created_at"]

    def validate_location(self, location: Location) -> Location:
        if not location.is_active:
            raise serializers.ValidationError("This location no longer takes requests.")
        return location

    def validate_name(self, name: str) -> str:
        return name or PrayerRequest._meta.get_field("name").default


class PrayerCountSerializer(serializers.ModelSerializer):
    class Meta:
        model = PrayerRequest
        fields = ["id", "prayer_count"]
        read_only_fields = fields


class FlagSerializer(serializers.ModelSerializer):
    flagged = serializers.SerializerMethodField()

    class Meta:
        model = PrayerRequest
        fields = ["id", "flagged"]
        read_only_fields = fields

    def get_flagged(self, request) -> bool:
        return request.flagged_at is not None


class ModerationRequestSerializer(serializers.ModelSerializer):
    """A request as staff see it, with its state and author."""

    location = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    author = serializers.CharField(source="author.get_username", read_only=True, default=None, allow_null=True)
    state = serializers.ChoiceField(choices=PrayerRequest.State.choices, read_only=True)

    class Meta:
        model = PrayerRequest
        fields = [
            "id",
            "type",
            "content",
            "name",
            "author",
            "location",
            "state",
            "prayer_count",
            "created_at",
            "approved_at",
            "flagged_at",
            "archived_at",
            "response",
            "responded_at",
        ]
        read_only_fields = fields


class ModerationFilterSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=PrayerRequest.State.choices, required=False)


class RespondSerializer(serializers.Serializer):
    response = StrictCharField(max_length=5000)


class PreferencesSerializer(serializers.ModelSerializer):
    class Meta:
        model = UserProfile
        fields = ["digest_frequency", "notify_on_response"]
