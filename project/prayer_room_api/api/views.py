"""The JSON API: public requests, staff moderation, a signed-in user's preferences."""

from django.db import transaction
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import generics, mixins, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from prayer_room_api import outbox
from prayer_room_api.models import Location, PrayerRequest, UserProfile

from . import serializers
from .throttles import FlagRateThrottle, PrayedRateThrottle, SubmitRateThrottle

ID_PATTERN = r"[0-9]+"
SLUG_PATTERN = r"[-a-zA-Z0-9_]+"


class LocationViewSet(viewsets.ReadOnlyModelViewSet):
    """Locations that take requests."""

    queryset = Location.objects.filter(is_active=True)
    serializer_class = serializers.LocationSerializer
    lookup_field = "slug"
    lookup_value_regex = SLUG_PATTERN
    pagination_class = None


@extend_schema_view(
    list=extend_schema(
        summary="Approved requests, newest first",
        parameters=[serializers.RequestFilterSerializer],
    ),
    retrieve=extend_schema(summary="One approved request"),
    create=extend_schema(
        summary="Submit a request for moderation",
        request=serializers.SubmitRequestSerializer,
        responses={201: serializers.SubmitRequestSerializer},
    ),
)
class PrayerRequestViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Approved prayer and praise requests; anyone may submit, pray for or flag one."""

    serializer_class = serializers.PrayerRequestSerializer
    lookup_value_regex = ID_PATTERN
    permission_classes = [permissions.AllowAny]

    def get_queryset(self):
        return PrayerRequest.objects.approved().select_related("location")

    def get_throttles(self):
        if self.action == "create":
            return [SubmitRateThrottle()]
        return super().get_throttles()

    def filter_queryset(self, queryset):
        if self.action != "list":
            return queryset
        filters = serializers.RequestFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        if "type" in filters.validated_data:
            queryset = queryset.filter(type=filters.validated_data["type"])
        if "location" in filters.validated_data:
            queryset = queryset.filter(location__slug=filters.validated_data["location"])
        return queryset

    def create(self, request, *args, **kwargs):
        serializer = serializers.SubmitRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        author = request.user if request.user.is_authenticated else None
        serializer.save(author=author)
        return Response(serializer.data, status=status.HTTP_201_CREATED)

    @extend_schema(summary='"I prayed for this"', request=None, responses=serializers.PrayerCountSerializer)
    @action(detail=True, methods=["post"], throttle_classes=[PrayedRateThrottle])
    def prayed(self, request, pk=None):
        prayer_request = self.get_object()
        prayer_request.record_prayer()
        return Response(serializers.PrayerCountSerializer(prayer_request).data)

    @extend_schema(summary="Flag a request for moderation", request=None, responses=serializers.FlagSerializer)
    @action(detail=True, methods=["post"], throttle_classes=[FlagRateThrottle])
    def flag(self, request, pk=None):
        prayer_request = self.get_object()
        prayer_request.flag()
        return Response(serializers.FlagSerializer(prayer_request).data)


@extend_schema_view(
    list=extend_schema(
        summary="All requests, for staff",
        parameters=[serializers.ModerationFilterSerializer],
    ),
)
class ModerationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Staff review requests: approve, archive, respond."""

    serializer_class = serializers.ModerationRequestSerializer
    permission_classes = [permissions.IsAdminUser]
    lookup_value_regex = ID_PATTERN

    def get_queryset(self):
        return PrayerRequest.objects.select_related("location", "author")

    def filter_queryset(self, queryset):
        if self.action != "list":
            return queryset
        filters = serializers.ModerationFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        state = filters.validated_data.get("state")
        if state == PrayerRequest.State.PENDING:
            queryset = queryset.pending().filter(flagged_at__isnull=True)
        elif state == PrayerRequest.State.FLAGGED:
            queryset = queryset.flagged()
        elif state == PrayerRequest.State.APPROVED:
            queryset = queryset.approved().filter(flagged_at__isnull=True)
        elif state == PrayerRequest.State.ARCHIVED:
            queryset = queryset.filter(archived_at__isnull=False)
        return queryset

    @extend_schema(summary="Approve (also clears a flag, restores an archived request)", request=None)
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        prayer_request = self.get_object()
        prayer_request.approve()
        prayer_request.save(update_fields=["approved_at", "flagged_at", "archived_at", "updated_at"])
        return Response(self.get_serializer(prayer_request).data)

    @extend_schema(summary="Archive: hidden from the public", request=None)
    @action(detail=True, methods=["post"])
    def archive(self, request, pk=None):
        prayer_request = self.get_object()
        prayer_request.archive()
        prayer_request.save(update_fields=["archived_at", "updated_at"])
        return Response(self.get_serializer(prayer_request).data)

    @extend_schema(summary="Respond; the author is emailed if they opted in", request=serializers.RespondSerializer)
    @action(detail=True, methods=["post"])
    def respond(self, request, pk=None):
        prayer_request = self.get_object()
        body = serializers.RespondSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        with transaction.atomic():
            prayer_request.respond(body.validated_data["response"], by=request.user)
            prayer_request.save(update_fields=["response", "responded_at", "responded_by", "updated_at"])
            outbox.enqueue_on_commit("prayer_room_api.tasks.send_response_notification", prayer_request.pk)
        return Response(self.get_serializer(prayer_request).data)


@extend_schema(summary="The signed-in user's email preferences")
class PreferencesView(generics.RetrieveUpdateAPIView):
    """Digest frequency and response notifications of the signed-in user."""

    serializer_class = serializers.PreferencesSerializer
    permission_classes = [permissions.IsAuthenticated]

    def get_object(self) -> UserProfile:
        return UserProfile.objects.for_user(self.request.user)
