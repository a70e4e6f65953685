"""Brute-force protection of the admin login (django-axes): a lockout of the username after AXES_FAILURE_LIMIT wrong
passwords from any addresses (the client address nginx saw is recorded), that staff can clear."""

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command
from django.test import RequestFactory

from prayer_room_api.backends import client_ip

pytestmark = pytest.mark.django_db
LOGIN = "/admin/login/"


def attempt(client, password: str, address: str = "198.51.100.7"):
    return client.post(
        LOGIN,
        {"username": "admin", "password": password, "next": "/admin/"},
        REMOTE_ADDR="127.0.0.1",
        HTTP_X_FORWARDED_FOR=address,
    )


@pytest.fixture
def admin_user(django_user_model, settings):
    settings.AXES_FAILURE_LIMIT = 5
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}  # production's: nginx in front
    return django_user_model.objects.create_superuser("admin", "admin@example.org", "right-pw")


def test_wrong_passwords_lock_the_login_out_even_for_the_right_one(client, admin_user):
    answers = [attempt(client, f"wrong-{n}").status_code for n in range(30)]
    assert answers[:4] == [200] * 4  # the form again, with its error
    assert set(answers[5:]) == {429}
    assert attempt(client, "right-pw").status_code == 429
    assert AccessAttempt.objects.get(username="admin").ip_address == "198.51.100.7"


def test_a_username_locks_out_across_addresses(client, admin_user, django_user_model):
    answers = [attempt(client, f"wrong-{n}", address=f"198.51.100.{n}").status_code for n in range(6)]
    assert answers[:4] == [200] * 4 and answers[5] == 429  # a guesser spread over addresses
    assert attempt(client, "right-pw", address="203.0.113.9").status_code == 429
    django_user_model.objects.create_user("other", "o@example.org", "other-pw", is_staff=True)
    other = client.post(LOGIN, {"username": "other", "password": "other-pw", "next": "/admin/"}, REMOTE_ADDR="1.2.3.4")
    assert other.status_code == 302  # another username is not locked out


def test_staff_clear_a_lockout(client, admin_user):
    for n in range(6):
        attempt(client, f"wrong-{n}")
    assert attempt(client, "right-pw").status_code == 429
    call_command("axes_reset_username", "admin")
    assert attempt(client, "right-pw").status_code == 302


def test_staff_see_and_delete_attempts_in_the_admin(client, admin_user, django_user_model):
    for n in range(6):
        attempt(client, f"wrong-{n}")
    staff = django_user_model.objects.create_superuser("moderator", "m@example.org", "pw")
    client.force_login(staff)
    assert client.get("/admin/axes/accessattempt/").status_code == 200
    pk = AccessAttempt.objects.get(username="admin").pk
    response = client.post(f"/admin/axes/accessattempt/{pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not AccessAttempt.objects.exists()
    client.logout()
    assert attempt(client, "right-pw").status_code == 302


def test_the_client_address_is_the_one_nginx_appended(settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    factory = RequestFactory()
    spoofed = factory.get("/", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="10.9.9.9, 198.51.100.7")
    assert client_ip(spoofed) == "198.51.100.7"
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 0}
    assert client_ip(spoofed) == "127.0.0.1"


def test_num_proxies_one_is_right_behind_the_balancer_too(settings):
    """A cluster's web host nginx takes the client address from the balancer's X-Forwarded-For (realip) and appends
    it again: one proxy's entry to skip, as on a single server. With 2, a client reaching a web host directly (its
    nginx answers for the balancer's name) would choose its own address."""
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    factory = RequestFactory()
    through_balancer = factory.get(
        "/", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="10.9.9.9, 198.51.100.7, 198.51.100.7"
    )
    direct = factory.get("/", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="10.9.9.9, 203.0.113.5")
    assert client_ip(through_balancer) == "198.51.100.7" and client_ip(direct) == "203.0.113.5"
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 2}
    assert client_ip(direct) == "10.9.9.9"  # what 2 would believe: the client's own claim
