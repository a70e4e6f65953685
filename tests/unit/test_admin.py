import pytest
from django.core import mail
from django.utils import timezone

from prayer_room_api.models import DigestDelivery, Prayer, PrayerRequest

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_site(client, django_user_model):
    admin = django_user_model.objects.create_superuser("admin", "admin@example.org", "pw")
    client.force_login(admin)
    return client


@pytest.mark.parametrize(
    "model, query",
    [
        ("location", {"q": "chap", "is_active__exact": "1"}),
        ("prayerrequest", {"q": "aunt", "state": "flagged", "type__exact": "prayer", "responded": "no"}),
        ("prayer", {"q": "aunt"}),
        ("userprofile", {"q": "user", "digest_frequency__exact": "daily"}),
        ("digestdelivery", {"q": "user", "kind__exact": "daily", "sent": "yes"}),
    ],
)
def test_changelists_search_and_filter(admin_site, make_request, make_user, model, query):
    request = make_request(content="Healing for my aunt", flagged_at=timezone.now())
    Prayer.objects.create(request=request)
    user = make_user(digest="daily")
    now = timezone.now()
    DigestDelivery.objects.create(
        user=user, kind="daily", period_start=now, covered_until=now, claim="0" * 32, sent_at=now
    )
    response = admin_site.get(f"/admin/prayer_room_api/{model}/", query)
    assert response.status_code == 200
    assert response.context["cl"].result_count == 1


def test_state_filter_separates_the_states(admin_site, make_request):
    pending = make_request(approved=False)
    flagged = make_request(flagged_at=timezone.now())
    archived = make_request(archived_at=timezone.now())
    approved = make_request()
    for state, expected in [("pending", pending), ("flagged", flagged), ("archived", archived), ("approved", approved)]:
        response = admin_site.get("/admin/prayer_room_api/prayerrequest/", {"state": state})
        assert list(response.context["cl"].result_list) == [expected], state


def test_approve_and_archive_actions(admin_site, make_request):
    pending = make_request(approved=False)
    flagged = make_request(flagged_at=timezone.now())
    changelist = "/admin/prayer_room_api/prayerrequest/"
    admin_site.post(changelist, {"action": "approve", "_selected_action": [pending.pk, flagged.pk]})
    assert set(PrayerRequest.objects.approved().filter(flagged_at__isnull=True)) == {pending, flagged}
    admin_site.post(changelist, {"action": "archive", "_selected_action": [pending.pk]})
    assert list(PrayerRequest.objects.approved()) == [flagged]


def test_a_response_written_in_the_admin_is_stamped_and_emailed(
    admin_site, make_request, make_user, django_capture_on_commit_callbacks
):
    request = make_request(author=make_user(email="ann@example.org"), content="Rain for the farm")
    form = {
        "content": request.content,
        "name": request.name,
        "type": request.type,
        "location": request.location_id,
        "author": request.author_id,
        "response": "Praying for rain with you.",
    }
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_site.post(f"/admin/prayer_room_api/prayerrequest/{request.pk}/change/", form)
    assert response.status_code == 302
    request.refresh_from_db()
    assert request.responded_by.username == "admin" and request.responded_at is not None
    assert [m.to for m in mail.outbox] == [["ann@example.org"]]

    with django_capture_on_commit_callbacks(execute=True):
        admin_site.post(f"/admin/prayer_room_api/prayerrequest/{request.pk}/change/", {**form, "content": "Rain!"})
    assert len(mail.outbox) == 1  # the response did not change
