import pytest
from django.db import IntegrityError
from django.utils import timezone

from prayer_room_api.models import DigestDelivery, Location, Prayer, PrayerRequest, UserProfile
from tests.support.concurrency import run_in_threads

pytestmark = pytest.mark.django_db


def test_a_new_request_is_anonymous_pending_prayer(location):
    request = PrayerRequest.objects.create(content="Healing for my aunt", location=location)
    assert (request.name, request.type, request.state, request.prayer_count) == ("Anonymous", "prayer", "pending", 0)
    assert list(PrayerRequest.objects.pending()) == [request]
    assert list(PrayerRequest.objects.approved()) == []


def test_states_follow_moderation(make_request):
    request = make_request(approved=False)
    request.approve()
    request.save()
    assert request.state == PrayerRequest.State.APPROVED
    request.flag()
    assert request.state == PrayerRequest.State.FLAGGED
    assert list(PrayerRequest.objects.flagged()) == [request]
    request.approve()
    request.save()
    assert (request.state, request.flagged_at) == (PrayerRequest.State.APPROVED, None)
    request.archive()
    request.save()
    assert request.state == PrayerRequest.State.ARCHIVED
    assert not PrayerRequest.objects.approved().exists()
    assert not PrayerRequest.objects.flagged().exists()


def test_approving_an_archived_request_restores_it(make_request):
    request = make_request(archived_at=timezone.now())
    request.approve()
    request.save()
    assert list(PrayerRequest.objects.approved()) == [request]


def test_flag_keeps_the_first_flag_time(make_request):
    request = make_request()
    request.flag()
    first = request.flagged_at
    request.flag()
    assert request.flagged_at == first


def test_record_prayer_counts_and_logs_each_prayer(make_request):
    request = make_request()
    assert request.record_prayer() == 1
    assert request.record_prayer() == 2
    assert Prayer.objects.filter(request=request).count() == 2


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_concurrent_prayers_are_all_counted(make_request):
    request = make_request()

    def pray():
        for _ in range(10):
            PrayerRequest.objects.get(pk=request.pk).record_prayer()

    assert run_in_threads(pray, 4) == []
    request.refresh_from_db()
    assert request.prayer_count == 40


def test_respond_stamps_time_and_staff(make_request, make_user):
    staff = make_user(staff=True)
    request = make_request()
    request.respond("We are praying with you.", by=staff)
    request.save()
    request.refresh_from_db()
    assert (request.response, request.responded_by) == ("We are praying with you.", staff)
    assert request.responded_at is not None


def test_every_new_user_gets_a_default_profile(make_user, django_user_model):
    user = django_user_model.objects.create_user("fresh")
    assert (user.profile.digest_frequency, user.profile.notify_on_response) == ("none", True)


def test_profile_for_user_creates_a_missing_one(django_user_model):
    user = django_user_model.objects.create_user("old")
    UserProfile.objects.filter(user=user).delete()
    profile = UserProfile.objects.for_user(user)
    assert profile.pk is not None
    assert UserProfile.objects.for_user(user) == profile


def test_a_location_in_use_cannot_be_deleted(make_request, location):
    from django.db.models import ProtectedError

    make_request()
    with pytest.raises(ProtectedError):
        location.delete()


def test_one_digest_per_user_kind_and_period(make_user):
    user = make_user()
    start = timezone.now().replace(minute=0, second=0, microsecond=0)
    fields = {"user": user, "kind": DigestDelivery.Kind.DAILY, "period_start": start, "covered_until": start}
    DigestDelivery.objects.create(claim="00000000-0000-0000-0000-000000000001", **fields)
    DigestDelivery.objects.create(claim="00000000-0000-0000-0000-000000000002", **{**fields, "kind": "weekly"})
    with pytest.raises(IntegrityError):
        DigestDelivery.objects.create(claim="00000000-0000-0000-0000-000000000003", **fields)


def test_string_forms_name_the_thing(make_request, location, make_user):
    request = make_request(content="Thanks for a new job", type="praise")
    assert str(request) == f"Praise #{request.pk}: Thanks for a new job"
    assert str(location) == "Chapel"
    assert str(Location(name="Crypt")) == "Crypt"
    assert str(make_user(username="ann").profile) == "Preferences of ann"
