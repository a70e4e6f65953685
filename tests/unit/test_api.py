import base64
import json
from io import BytesIO, StringIO
from wsgiref.util import setup_testing_defaults

import pytest
from django.conf import settings
from django.core import mail
from django.core.management import call_command
from django.utils import timezone

from prayer_room_api.models import Location, PrayerRequest

pytestmark = pytest.mark.django_db

REQUESTS = "/api/requests/"


def rate_limit(scope: str) -> int:
    """How many calls the configured rate allows, e.g. 10 for "10/hour"."""
    return int(settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"][scope].split("/")[0])


def submit(api, **fields):
    body = {"content": "Please pray for my exams", "location": "chapel", **fields}
    return api.post(REQUESTS, body, format="json")


# --- listing ---


def test_list_shows_only_approved_requests_newest_first(api, make_request):
    older, newer = make_request(content="older"), make_request(content="newer")
    make_request(approved=False, content="pending")
    make_request(archived_at=timezone.now(), content="archived")
    response = api.get(REQUESTS)
    assert response.status_code == 200
    assert [r["id"] for r in response.json()["results"]] == [newer.pk, older.pk]
    assert response.json()["count"] == 2


def test_list_shows_public_fields_and_no_author(api, make_request, make_user):
    request = make_request(author=make_user(), name="Ann", response="Praying", responded_at=timezone.now())
    item = api.get(REQUESTS).json()["results"][0]
    assert item["id"] == request.pk
    assert (item["name"], item["location"], item["location_name"], item["response"]) == (
        "Ann",
        "chapel",
        "Chapel",
        "Praying",
    )
    assert "author" not in item and "approved_at" not in item


def test_list_is_paginated(api, make_request):
    for _ in range(settings.REST_FRAMEWORK["PAGE_SIZE"] + 3):
        make_request()
    first = api.get(REQUESTS).json()
    assert len(first["results"]) == settings.REST_FRAMEWORK["PAGE_SIZE"]
    second = api.get(first["next"]).json()
    assert len(second["results"]) == 3 and second["next"] is None


def test_list_filters_by_type_and_location(api, make_request):
    crypt = Location.objects.create(name="Crypt", slug="crypt")
    praise_in_crypt = make_request(type="praise", location=crypt)
    prayer_in_crypt = make_request(type="prayer", location=crypt)
    make_request(type="praise")

    def ids(query):
        return {r["id"] for r in api.get(REQUESTS, query).json()["results"]}

    assert ids({"location": "crypt"}) == {praise_in_crypt.pk, prayer_in_crypt.pk}
    assert ids({"location": "crypt", "type": "praise"}) == {praise_in_crypt.pk}
    assert ids({"location": "nowhere"}) == set()


@pytest.mark.parametrize(
    "query, field",
    [({"type": "lament"}, "type"), ({"location": "not a slug!"}, "location"), ({"location": "x" * 500}, "location")],
)
def test_bad_list_filters_are_400s_naming_the_field(api, query, field):
    response = api.get(REQUESTS, query)
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.parametrize("page", ["abc", "0", "99", "-1"])
def test_a_page_that_does_not_exist_is_404(api, make_request, page):
    make_request()
    assert api.get(REQUESTS, {"page": page}).status_code == 404


def test_retrieve_an_approved_request(api, make_request):
    request = make_request()
    assert api.get(f"{REQUESTS}{request.pk}/").json()["content"] == request.content


@pytest.mark.parametrize(
    "path", ["{pending}/", "{archived}/", "999999/", "abc/", "99999999999999999999999999/", "1.5/", "-1/"]
)
def test_unknown_hidden_or_malformed_ids_are_404(api, make_request, path):
    pending = make_request(approved=False)
    archived = make_request(archived_at=timezone.now())
    url = REQUESTS + path.format(pending=pending.pk, archived=archived.pk)
    assert api.get(url).status_code == 404
    assert api.post(url + "prayed/").status_code == 404
    assert api.post(url + "flag/").status_code == 404


# --- submitting ---


def test_submit_creates_a_pending_anonymous_request(api, location):
    response = submit(api, type="praise")
    assert response.status_code == 201, response.json()
    created = PrayerRequest.objects.get(pk=response.json()["id"])
    assert (created.state, created.name, created.type, created.author) == ("pending", "Anonymous", "praise", None)
    assert response.json()["location"] == "chapel"
    assert api.get(REQUESTS).json()["count"] == 0


def test_submit_signed_in_records_the_author(api, location, make_user):
    user = make_user()
    api.force_authenticate(user)
    response = submit(api, name="Ann")
    assert response.status_code == 201
    created = PrayerRequest.objects.get(pk=response.json()["id"])
    assert (created.author, created.name) == (user, "Ann")


def test_submit_with_a_blank_name_stays_anonymous(api, location):
    response = submit(api, name="")
    assert response.status_code == 201
    assert response.json()["name"] == "Anonymous"


def test_submit_by_form_post_works_too(api, location):
    response = api.post(REQUESTS, {"content": "Peace", "location": "chapel"})
    assert response.status_code == 201


def test_submit_to_an_inactive_location_is_rejected(api, location):
    Location.objects.filter(pk=location.pk).update(is_active=False)
    response = submit(api)
    assert response.status_code == 400
    assert response.json() == {"location": ["This location no longer takes requests."]}
    assert not PrayerRequest.objects.exists()


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"content": ""}, "content"),
        ({"content": "   "}, "content"),
        ({"content": None}, "content"),
        ({"content": "x" * 2001}, "content"),
        ({"content": "x" * 1_000_000}, "content"),
        ({"content": ["a", "list"]}, "content"),
        ({"content": {"an": "object"}}, "content"),
        ({"content": True}, "content"),
        ({"content": "nul \x00 byte"}, "content"),
        ({"name": "x" * 101}, "name"),
        ({"name": 12.5e300}, "name"),
        ({"name": 42}, "name"),
        ({"type": "lament"}, "type"),
        ({"type": 5}, "type"),
        ({"type": ["prayer"]}, "type"),
        ({"location": "nowhere"}, "location"),
        ({"location": 1}, "location"),
        ({"location": {"slug": "chapel"}}, "location"),
        ({"location": None}, "location"),
    ],
)
def test_bad_submissions_are_400s_naming_the_field(api, location, fields, field):
    response = submit(api, **fields)
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert not PrayerRequest.objects.exists()


def test_submit_without_required_fields_names_each(api, location):
    response = api.post(REQUESTS, {}, format="json")
    assert response.status_code == 400
    assert set(response.json()) == {"content", "location"}


@pytest.mark.parametrize(
    "body, content_type",
    [
        ('{"content": "unterminated', "application/json"),
        ("[1, 2, 3]", "application/json"),
        ('"just a string"', "application/json"),
        ("null", "application/json"),
        ("\xff\xfe not utf-8", "application/json"),
        ("<xml/>", "application/xml"),
    ],
)
def test_malformed_bodies_are_4xx_not_500(api, location, body, content_type):
    response = api.generic("POST", REQUESTS, body.encode("latin-1"), content_type=content_type)
    assert response.status_code in (400, 415)
    assert not PrayerRequest.objects.exists()


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_a_body_over_the_upload_limit_is_400(api, location, settings, content_type):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    body = json.dumps({"content": "x" * 20_000, "location": "chapel"})
    if content_type != "application/json":
        body = "location=chapel&content=" + "x" * 20_000
    response = api.generic("POST", REQUESTS, body, content_type=content_type)
    assert response.status_code == 400
    assert not PrayerRequest.objects.exists()


# --- praying and flagging ---


def test_prayed_increments_the_count(api, make_request):
    request = make_request()
    assert api.post(f"{REQUESTS}{request.pk}/prayed/").json() == {"id": request.pk, "prayer_count": 1}
    assert api.post(f"{REQUESTS}{request.pk}/prayed/").json() == {"id": request.pk, "prayer_count": 2}
    assert api.get(f"{REQUESTS}{request.pk}/").json()["prayer_count"] == 2


def test_prayed_ignores_a_malformed_body(api, make_request):
    request = make_request()
    response = api.generic("POST", f"{REQUESTS}{request.pk}/prayed/", b"{nope", content_type="application/json")
    assert response.status_code == 200


def test_flag_hides_a_request_until_a_moderator_approves_it_again(api, staff_api, make_request):
    request = make_request()
    response = api.post(f"{REQUESTS}{request.pk}/flag/")
    assert response.json() == {"id": request.pk, "flagged": True}
    request.refresh_from_db()
    assert request.state == "flagged"
    assert api.get(REQUESTS).json()["count"] == 0
    assert api.get(f"{REQUESTS}{request.pk}/").status_code == 404
    flagged = staff_api.get("/api/moderation/requests/", {"state": "flagged"}).json()["results"]
    assert [r["id"] for r in flagged] == [request.pk]
    assert staff_api.post(f"/api/moderation/requests/{request.pk}/approve/").status_code == 200
    assert api.get(REQUESTS).json()["count"] == 1


def test_listing_allows_get_only(api):
    assert api.delete(REQUESTS).status_code == 405
    assert api.put(REQUESTS, {}).status_code == 405


# --- rate limits ---


@pytest.mark.parametrize("scope, action", [("prayed", "prayed"), ("flag", "flag")])
def test_pray_and_flag_are_rate_limited(api, make_request, scope, action):
    for _ in range(rate_limit(scope)):
        assert api.post(f"{REQUESTS}{make_request().pk}/{action}/").status_code == 200
    response = api.post(f"{REQUESTS}{make_request().pk}/{action}/")
    assert response.status_code == 429
    assert "Retry-After" in response.headers


def test_submit_is_rate_limited_per_client(api, location):
    for _ in range(rate_limit("submit")):
        assert submit(api).status_code == 201
    assert submit(api).status_code == 429
    assert PrayerRequest.objects.count() == rate_limit("submit")
    other_client = api.post(REQUESTS, {"content": "x", "location": "chapel"}, format="json", REMOTE_ADDR="10.0.0.9")
    assert other_client.status_code == 201


def test_reading_is_not_rate_limited(api, make_request):
    for _ in range(rate_limit("submit") + 5):
        assert api.get(REQUESTS).status_code == 200


# --- moderation ---


@pytest.mark.parametrize("path", ["", "1/", "1/approve/", "1/archive/", "1/respond/"])
def test_moderation_is_for_staff_only(api, make_user, make_request, path):
    make_request(pk=1)
    method = api.get if path.count("/") < 2 else api.post
    assert method(f"/api/moderation/requests/{path}").status_code == 403
    api.force_authenticate(make_user())
    assert method(f"/api/moderation/requests/{path}").status_code == 403


def test_staff_approve_makes_a_request_public(api, staff_api, make_request):
    request = make_request(approved=False)
    response = staff_api.post(f"/api/moderation/requests/{request.pk}/approve/")
    assert response.status_code == 200 and response.json()["state"] == "approved"
    assert [r["id"] for r in api.get(REQUESTS).json()["results"]] == [request.pk]


def test_staff_archive_hides_a_request(api, staff_api, make_request):
    request = make_request()
    response = staff_api.post(f"/api/moderation/requests/{request.pk}/archive/")
    assert response.json()["state"] == "archived"
    assert api.get(REQUESTS).json()["count"] == 0


def test_staff_list_filters_by_state(staff_api, make_request):
    pending = make_request(approved=False)
    approved = make_request()
    archived = make_request(archived_at=timezone.now())

    def ids(state):
        return [r["id"] for r in staff_api.get("/api/moderation/requests/", {"state": state}).json()["results"]]

    assert (ids("pending"), ids("approved"), ids("archived")) == ([pending.pk], [approved.pk], [archived.pk])
    assert staff_api.get("/api/moderation/requests/", {"state": "gone"}).status_code == 400


def test_staff_respond_emails_the_author_after_commit(
    api, staff_api, make_request, make_user, django_capture_on_commit_callbacks
):
    author = make_user(email="ann@example.org")
    request = make_request(author=author)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = staff_api.post(
            f"/api/moderation/requests/{request.pk}/respond/", {"response": "We prayed & rejoice"}, format="json"
        )
        assert mail.outbox == []  # nothing leaves before the response is committed
    assert response.status_code == 200
    assert len(callbacks) == 1
    assert response.json()["response"] == "We prayed & rejoice"
    request.refresh_from_db()
    assert request.responded_by.username == "moderator"
    assert [m.to for m in mail.outbox] == [["ann@example.org"]]
    assert "We prayed & rejoice" in mail.outbox[0].body
    assert api.get(f"{REQUESTS}{request.pk}/").json()["response"] == "We prayed & rejoice"


@pytest.mark.parametrize("body", [{}, {"response": ""}, {"response": "x" * 5001}, {"response": ["a"]}])
def test_respond_needs_a_response(staff_api, make_request, body, django_capture_on_commit_callbacks):
    request = make_request()
    with django_capture_on_commit_callbacks(execute=True):
        response = staff_api.post(f"/api/moderation/requests/{request.pk}/respond/", body, format="json")
    assert response.status_code == 400 and "response" in response.json()
    assert mail.outbox == []


def test_moderating_an_unknown_request_is_404(staff_api):
    for action in ("approve", "archive", "respond"):
        assert staff_api.post(f"/api/moderation/requests/424242/{action}/").status_code == 404
    assert staff_api.post("/api/moderation/requests/abc/approve/").status_code == 404


# --- preferences ---

PREFERENCES = "/api/me/preferences/"


def test_preferences_need_a_signed_in_user(api):
    assert api.get(PREFERENCES).status_code == 403
    assert api.patch(PREFERENCES, {"digest_frequency": "daily"}, format="json").status_code == 403


def test_a_user_reads_and_changes_their_preferences(api, make_user):
    user, other = make_user(), make_user()
    api.force_authenticate(user)
    assert api.get(PREFERENCES).json() == {"digest_frequency": "none", "notify_on_response": True}
    response = api.patch(PREFERENCES, {"digest_frequency": "weekly", "notify_on_response": False}, format="json")
    assert response.json() == {"digest_frequency": "weekly", "notify_on_response": False}
    user.profile.refresh_from_db()
    other.profile.refresh_from_db()
    assert (user.profile.digest_frequency, user.profile.notify_on_response) == ("weekly", False)
    assert other.profile.digest_frequency == "none"


def test_preferences_are_created_for_a_user_without_a_profile(api, make_user):
    user = make_user()
    user.profile.delete()
    api.force_authenticate(user)
    assert api.get(PREFERENCES).json()["digest_frequency"] == "none"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"digest_frequency": "hourly"}, "digest_frequency"),
        ({"digest_frequency": ["daily"]}, "digest_frequency"),
        ({"notify_on_response": "maybe"}, "notify_on_response"),
        ({"notify_on_response": {"yes": 1}}, "notify_on_response"),
    ],
)
def test_bad_preferences_are_400s(api, make_user, body, field):
    api.force_authenticate(make_user())
    response = api.patch(PREFERENCES, body, format="json")
    assert response.status_code == 400 and field in response.json()


def test_put_preferences_replaces_both(api, make_user):
    api.force_authenticate(make_user())
    body = {"digest_frequency": "daily", "notify_on_response": False}
    assert api.put(PREFERENCES, body, format="json").json() == body


# --- schema ---


def test_locations_lists_only_active_ones(api, location):
    Location.objects.create(name="Old hall", slug="old-hall", is_active=False)
    assert api.get("/api/locations/").json() == [{"slug": "chapel", "name": "Chapel"}]


def test_openapi_schema_documents_every_endpoint_without_warnings():
    out = StringIO()
    call_command("spectacular", "--validate", "--fail-on-warn", "--format", "openapi-json", stdout=out)
    paths = json.loads(out.getvalue())["paths"]
    for path in (
        "/api/requests/",
        "/api/requests/{id}/prayed/",
        "/api/requests/{id}/flag/",
        "/api/moderation/requests/{id}/respond/",
        "/api/me/preferences/",
    ):
        assert path in paths
    assert "post" in paths["/api/requests/"]


def test_schema_endpoint_serves(api):
    assert api.get("/api/schema/").status_code == 200


# --- bad input found by tests/integration/test_api_fuzz.py: 4xx in JSON, never a 500 ---


def json_post(api, path, body: bytes):
    return api.generic("POST", path, body, content_type="application/json")


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_json_nested_deeper_than_python_recurses_is_400(api, location, depth):
    body = b'{"content": ' + b"[" * depth + b"]" * depth + b', "location": "chapel"}'
    response = json_post(api, REQUESTS, body)
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["detail"]
    assert not PrayerRequest.objects.exists()


@pytest.mark.parametrize(
    "body", [b'{"content": "x", "location": "chapel", "type": "\\ud800"}', b'{"content": "x", "\\udfff": 1}']
)
def test_a_lone_surrogate_in_json_is_400(api, location, body):
    response = json_post(api, REQUESTS, body)
    assert response.status_code == 400
    assert "lone surrogate" in response.json()["detail"]
    assert not PrayerRequest.objects.exists()


def test_a_lone_surrogate_in_preferences_is_400(api, make_user):
    api.force_authenticate(make_user())
    response = api.generic("PATCH", PREFERENCES, b'{"digest_frequency": "\\ud800"}', content_type="application/json")
    assert response.status_code == 400


def test_paired_surrogates_are_text_and_accepted(api, location):
    response = json_post(api, REQUESTS, b'{"content": "praise \\ud83d\\ude4f", "location": "chapel"}')
    assert response.status_code == 201
    assert PrayerRequest.objects.get().content == "praise \N{PERSON WITH FOLDED HANDS}"


@pytest.mark.parametrize("slug", ["cha\x00pel", "\x00", "chapel\x00"])
def test_a_nul_in_the_location_of_a_submission_is_400(api, location, slug):
    response = submit(api, location=slug)
    assert response.status_code == 400
    assert response.json() == {
        "location": ['Enter a valid "slug" consisting of letters, numbers, underscores or hyphens.']
    }


@pytest.mark.parametrize("path", ["cha%00pel/", "%00/", "not a slug/", "x.y/"])
def test_a_location_url_that_is_no_slug_is_a_json_404(api, location, path):
    response = api.get(f"/api/locations/{path}")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"


def test_a_location_is_found_by_its_slug(api, location):
    assert api.get("/api/locations/chapel/").json() == {"slug": "chapel", "name": "Chapel"}


@pytest.mark.parametrize("username", ["mod\x00erator", "\x00"])
def test_a_nul_in_a_basic_auth_username_is_refused_not_a_500(api, make_user, username):
    make_user(username="moderator", staff=True)
    token = base64.b64encode(f"{username}:pw".encode()).decode()
    response = api.get(REQUESTS, HTTP_AUTHORIZATION=f"Basic {token}")
    assert response.status_code == 403
    assert response.json() == {"detail": "Invalid username/password."}


def test_basic_auth_signs_a_moderator_in(api, make_user):
    make_user(username="moderator", staff=True)
    token = base64.b64encode(b"moderator:pw").decode()
    assert api.get("/api/moderation/requests/", HTTP_AUTHORIZATION=f"Basic {token}").status_code == 200


@pytest.mark.parametrize("path", ["/api/requests/abc/", "/api/requests/-1/prayed/", "/api/no-such-thing/"])
def test_api_urls_that_match_nothing_are_json_404s(api, path):
    response = api.get(path)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


def test_other_urls_that_match_nothing_keep_the_html_404(api):
    response = api.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_a_body_over_the_upload_limit_is_a_json_400(api, location, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    body = json.dumps({"content": "x" * 20_000, "location": "chapel"})
    response = api.generic("POST", REQUESTS, body, content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"detail": "Bad request."}


def openapi_schema() -> dict:
    out = StringIO()
    call_command("spectacular", "--format", "openapi-json", stdout=out)
    return json.loads(out.getvalue())


def test_schema_documents_the_errors_each_operation_answers():
    paths = openapi_schema()["paths"]

    def statuses(path, method):
        return set(paths[path][method]["responses"])

    assert statuses("/api/requests/", "get") == {"200", "400", "403", "404"}
    assert statuses("/api/requests/", "post") == {"201", "400", "403", "415", "429"}
    assert statuses("/api/requests/{id}/", "get") == {"200", "403", "404"}
    assert statuses("/api/requests/{id}/prayed/", "post") == {"200", "403", "404", "429"}
    assert statuses("/api/moderation/requests/{id}/respond/", "post") == {"200", "400", "403", "404", "415"}
    assert statuses("/api/me/preferences/", "patch") == {"200", "400", "403", "415"}
    assert statuses("/api/locations/", "get") == {"200", "403"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert list(response["content"]) == ["application/json"], (method, path, status)


def test_schema_states_what_the_api_really_accepts_and_answers():
    schema = openapi_schema()
    components = schema["components"]["schemas"]
    assert components["ModerationRequest"]["properties"]["author"]["nullable"] is True
    assert components["SubmitRequestRequest"]["properties"]["location"]["pattern"] == "^[-a-zA-Z0-9_]+$"
    assert components["SubmitRequestRequest"]["properties"]["content"]["minLength"] == 1
    assert components["RespondRequest"]["properties"]["response"]["minLength"] == 1
    filters = {p["name"]: p["schema"] for p in schema["paths"]["/api/requests/"]["get"]["parameters"]}
    assert filters["location"]["pattern"] == "^[-a-zA-Z0-9_]+$" and filters["location"]["maxLength"] == 100
    assert "/api/schema/" not in schema["paths"]


def test_a_request_without_an_author_lists_author_as_null(staff_api, make_request):
    make_request()
    assert staff_api.get("/api/moderation/requests/").json()["results"][0]["author"] is None


def wsgi_request(query: str, content_type: str, body: bytes = b""):
    from prayer_room_api.wsgi import WSGIRequest

    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/requests/",
        "QUERY_STRING": query,
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": BytesIO(body),
    }
    setup_testing_defaults(environ)
    return WSGIRequest(environ)


@pytest.mark.parametrize("charset", ["rot13", "zlib", "base64", "idna", "punycode", "undefined", "no-such-charset"])
def test_a_charset_that_cannot_decode_text_is_ignored_like_an_unknown_one(charset):
    request = wsgi_request(
        "location=chapel", f"application/x-www-form-urlencoded; charset={charset}", b"content=x%C3%A9&name=a%3Db"
    )
    assert request.encoding is None
    assert request.GET["location"] == "chapel"
    assert (request.POST["content"], request.POST["name"]) == ("x\N{LATIN SMALL LETTER E WITH ACUTE}", "a=b")


def test_a_charset_that_decodes_text_is_used():
    request = wsgi_request("location=x%E9", "text/plain; charset=latin-1")
    assert request.encoding == "latin-1"
    assert request.GET["location"] == "x\N{LATIN SMALL LETTER E WITH ACUTE}"
