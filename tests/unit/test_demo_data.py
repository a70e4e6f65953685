"""`manage.py demo_data`: something to look at in a fresh local database, and a way in as staff."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from prayer_room_api.models import Location, PrayerRequest

pytestmark = pytest.mark.django_db


@pytest.fixture
def debug(settings):
    settings.DEBUG = True


def test_loads_locations_approved_and_pending_requests_and_a_staff_account(debug, capsys, client):
    call_command("demo_data")
    out = capsys.readouterr().out
    assert Location.objects.count() == 2
    assert PrayerRequest.objects.approved().count() == 3 and PrayerRequest.objects.pending().count() == 2
    password = out.split("user demo-staff, password ")[1].split()[0]
    staff = get_user_model().objects.get(username="demo-staff")
    assert staff.is_staff and staff.check_password(password)
    assert client.login(username="demo-staff", password=password)
    assert client.get("/admin/prayer_room_api/prayerrequest/").status_code == 200


def test_running_it_again_adds_nothing_and_says_how_to_sign_in(debug, capsys):
    call_command("demo_data")
    call_command("demo_data")
    out = capsys.readouterr().out
    assert PrayerRequest.objects.count() == 5 and Location.objects.count() == 2
    assert "0 new requests" in out and "manage.py changepassword demo-staff" in out


def test_if_empty_leaves_a_database_with_locations_alone(debug, capsys):
    Location.objects.create(name="Crypt", slug="crypt")
    call_command("demo_data", "--if-empty")
    assert capsys.readouterr().out == ""
    assert list(Location.objects.values_list("slug", flat=True)) == ["crypt"]
    assert not get_user_model().objects.exists()


def test_refuses_a_database_that_is_not_local():
    with pytest.raises(CommandError, match="for a local database"):
        call_command("demo_data")
    assert not Location.objects.exists()
