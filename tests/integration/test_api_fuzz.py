"""Bad input never gives a 500: requests generated from the API's own OpenAPI schema, sent to the real web.

NOTE: schemathesis' pytest loader `from_fixture` reads `Item._nodeid`, which pytest 9.2 removed, so the
generated cases are driven with Hypothesis here through schemathesis' Python API (`as_strategy`).
"""

import base64
import json
import re
import secrets

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup

from tests.support import stack

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 20  # per operation and mode; 15 operations x 2 modes keeps the run near a minute
STAFF = ("fuzz-moderator", secrets.token_urlsafe(16))
SEED = """
from django.utils import timezone
from prayer_room_api.models import Location, PrayerRequest
chapel = Location.objects.create(name="Chapel", slug="chapel")
Location.objects.create(name="Old hall", slug="old-hall", is_active=False)
for n in range(3):
    PrayerRequest.objects.create(content=f"Request {n}", location=chapel, approved_at=timezone.now())
PrayerRequest.objects.create(content="Waiting", location=chapel)
"""
# Whether a request should be accepted depends on data the schema cannot state (a slug naming no
# location is a 400; DRF reads an empty form or query value as absent), so these two checks are off.
ACCEPTANCE_CHECKS = [schemathesis.checks.positive_data_acceptance, schemathesis.checks.negative_data_rejection]


@pytest.fixture(scope="module")
def web(env, redis_db, tmp_path_factory):
    """`prodserver web` on the production settings, with a staff user, some requests and generous rate limits.

    Its rate-limit counters go to the module's Redis db, flushed afterwards: in the production default
    (db 1) they would throttle other webs on this machine for an hour.
    """
    stack.manage(env, "shell", "-c", SEED)
    stack.manage(
        {**env, "DJANGO_SUPERUSER_PASSWORD": STAFF[1]},
        *("createsuperuser", "--noinput", "--username", STAFF[0], "--email", "moderator@example.org"),
    )
    port = stack.free_port()
    rates = {f"THROTTLE_{scope}": "100000/hour" for scope in ("SUBMIT", "PRAYED", "FLAG")}
    cache = {"CACHE_URL": f"{stack.redis_url()}/{redis_db}"}
    process = stack.Process("web", {**env, "PORT": str(port), **rates, **cache}, tmp_path_factory.mktemp("web"))
    base_url = f"http://127.0.0.1:{port}"
    process.wait_for_http(f"{base_url}/health/")
    yield base_url
    process.stop()
    errors = re.findall(r'^.*"(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) [^"]*" 5\d\d .*$', process.output(), re.M)
    assert not errors, "the web answered 5xx:\n" + "\n".join(errors[:20])


@pytest.fixture(scope="module")
def staff_session(web):
    """A staff session signed in through the admin login, as a moderator's browser has.

    Production has no Basic auth (which would hash the password on every request, a third of a second each):
    the fuzzing and the nasty cases below sign in with this session.
    """
    session = requests.Session()
    session.get(f"{web}/admin/login/", timeout=10)
    response = session.post(
        f"{web}/admin/login/",
        data={"username": STAFF[0], "password": STAFF[1], "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        timeout=10,
    )
    assert "sessionid" in session.cookies, response.text[:500]
    return session


@pytest.fixture(scope="module")
def api_schema(web):
    """The schema the running web serves, fetched as a client would."""
    loaded = schemathesis.openapi.from_url(f"{web}/api/schema/?format=json")
    loaded.config.update(base_url=web)
    return loaded


def needs_login(operation) -> bool:
    """True when the schema offers no anonymous way in (an empty security requirement)."""
    return {} not in operation.definition.raw.get("security", [{}])


def fuzz(operation, mode: GenerationMode, credentials: dict, sent: list) -> str | None:
    """Send up to MAX_EXAMPLES generated cases of one operation; the first failure's report, or None."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        sent.append(case)
        case.call_and_validate(excluded_checks=ACCEPTANCE_CHECKS, timeout=10, **credentials)

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, f"no valid request for {operation.label}"
        return None  # the operation takes no input that could be wrong
    except (Exception, FailureGroup) as exc:  # noqa: BLE001 - each failure is reported with its operation
        return f"{mode.value} {operation.label}:\n{exc}"
    return None


# Values a generator rarely draws from a schema but clients do send: NULs (PostgreSQL refuses them),
# numbers past bigint, text that is no number or slug, and in JSON other types. (Lone surrogates are
# among the hand-written cases: schemathesis encodes JSON bodies as UTF-8, which cannot carry them.)
NASTY_TEXT = ["\x00", "cha\x00pel", "99999999999999999999", "-1", "1.5", " ", "x" * 3000, "\u202e\u0661", ""]
NASTY_JSON = [*NASTY_TEXT, None, True, 1e308, -(2**63), 2**64, [], {}, [["chapel"]], {"": 1}]


def nasty_values_for(case, where: str) -> list:
    if where == "path_parameters":  # "" would send the request to another URL
        return [value for value in NASTY_TEXT if value]
    if where == "body" and (case.media_type or "").endswith("json"):
        return NASTY_JSON
    return NASTY_TEXT  # URLs and forms carry text


def documented_inputs(operation, media_type: str | None) -> dict[str, list[str]]:
    """The names of every path and query parameter and body property the schema documents for the operation."""
    parameters = operation.definition.raw.get("parameters", [])
    inputs = {
        "path_parameters": [p["name"] for p in parameters if p["in"] == "path"],
        "query": [p["name"] for p in parameters if p["in"] == "query"],
        "body": [],
    }
    if media_type:
        body_schema = operation.definition.raw["requestBody"]["content"][media_type]["schema"]
        if "$ref" in body_schema:
            body_schema = operation.schema.raw_schema["components"]["schemas"][body_schema["$ref"].rsplit("/", 1)[1]]
        inputs["body"] = list(body_schema.get("properties", {}))
    return inputs


def sweep(operation, credentials: dict, sent: list) -> list[str]:
    """A valid case of the operation, with each documented input set in turn to each nasty value."""
    failures = []

    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    @settings(max_examples=1, deadline=None, database=None, phases=[Phase.generate])
    def run(case):
        for where, names in documented_inputs(operation, case.media_type).items():
            original = getattr(case, where)
            for name in names:
                for value in nasty_values_for(case, where):
                    setattr(case, where, {**(original or {}), name: value})
                    sent.append(case)
                    try:
                        case.call_and_validate(excluded_checks=ACCEPTANCE_CHECKS, timeout=10, **credentials)
                    except (Exception, FailureGroup) as exc:  # noqa: BLE001 - reported with the value
                        failures.append(f"{operation.label} with {where} {name}={value!r:.40}:\n{exc}")
            setattr(case, where, original)

    run()
    return failures


def test_generated_requests_get_no_server_error_and_match_the_schema(api_schema, staff_session):
    """Valid and invalid cases of every operation, then nasty values in each of their fields: never a 5xx;
    statuses, content types and bodies as documented."""
    staff = {
        "cookies": staff_session.cookies.get_dict(),
        "headers": {"X-CSRFToken": staff_session.cookies["csrftoken"]},
    }
    generated, swept, failures = [], [], []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation in operations:
        credentials = staff if needs_login(operation) else {}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failure = fuzz(operation, mode, credentials, generated)
            if failure:
                failures.append(failure)
        failures += sweep(operation, credentials, swept)
    print(f"\n{len(generated)} generated and {len(swept)} nasty-value requests over {len(operations)} operations")
    assert len(operations) == 15
    assert not failures, "\n\n".join(failures)
    assert len(generated) > 300 and len(swept) > 200, "generation stalled: see Hypothesis' statistics"


def basic_auth(username: str, password: str) -> dict:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def nested(depth: int) -> bytes:
    return b'{"content": ' + b"[" * depth + b"]" * depth + b', "location": "chapel"}'


JSON = {"Content-Type": "application/json"}
AS_STAFF = {**JSON, "X-Sent-As": "staff"}  # sent with the staff session (see test_nasty_requests_are_4xx_in_json)
NASTY = {
    "a body over the upload limit": ("POST", "/api/requests/", JSON, json.dumps({"content": "x" * 3_000_000})),
    "invalid UTF-8 in JSON": ("POST", "/api/requests/", JSON, b'{"content": "\xff\xfe", "location": "chapel"}'),
    "a lone surrogate in a choice": ("POST", "/api/requests/", JSON, b'{"content": "x", "type": "\\ud800"}'),
    "a lone surrogate in preferences": (
        "PATCH",
        "/api/me/preferences/",
        AS_STAFF,
        b'{"digest_frequency": "\\ud800"}',
    ),
    "plain text": ("POST", "/api/requests/", {"Content-Type": "text/plain"}, b"content=x"),
    "XML": ("POST", "/api/requests/", {"Content-Type": "application/xml"}, b"<content>x</content>"),
    "multipart without a boundary": ("POST", "/api/requests/", {"Content-Type": "multipart/form-data"}, b"x"),
    "JSON nested 100 000 deep": ("POST", "/api/requests/", JSON, nested(100_000)),
    "JSON nested 2 000 deep": ("POST", "/api/requests/", JSON, nested(2_000)),
    "a NUL in a location slug": ("POST", "/api/requests/", JSON, b'{"content": "x", "location": "cha\\u0000pel"}'),
    "an id over bigint": ("GET", "/api/requests/99999999999999999999/", {}, None),
    "praying for an id over bigint": ("POST", "/api/requests/99999999999999999999/prayed/", {}, None),
    "moderating an id over bigint": (
        "POST",
        "/api/moderation/requests/99999999999999999999/approve/",
        AS_STAFF,
        None,
    ),
    "an id that is not a number": ("GET", "/api/requests/abc/", {}, None),
    "a NUL in a location's URL": ("GET", "/api/locations/cha%00pel/", {}, None),
    "a NUL in the type filter": ("GET", "/api/requests/?type=%00", {}, None),
    "a NUL in the location filter": ("GET", "/api/requests/?location=cha%00pel", {}, None),
    "a NUL in the page number": ("GET", "/api/requests/?page=1%00", {}, None),
    "a NUL in the state filter": ("GET", "/api/moderation/requests/?state=%00", AS_STAFF, None),
    "invalid UTF-8 in the query": ("GET", "/api/requests/?location=%ff%fe", {}, None),
    "a NUL in a basic-auth username": ("GET", "/api/moderation/requests/", basic_auth("mod\x00erator", "pw"), None),
    "a wrong basic-auth password": ("GET", "/api/moderation/requests/", basic_auth(STAFF[0], "wrong"), None),
    "basic auth that is not base64": ("GET", "/api/moderation/requests/", {"Authorization": "Basic !!!"}, None),
    "an unknown API path": ("GET", "/api/no-such-thing/", {}, None),
}


# Django ignores a charset it does not know; one that names no text codec (rot13, zlib, idna, punycode)
# is ignored the same way, so these are answered as UTF-8: the query works, a body lacks its location.
ODD_CHARSETS = {
    "rot13 on a query": ("GET", "/api/requests/?type=praise", "text/plain; charset=rot13", None, 200),
    "zlib on a JSON body": (
        "POST",
        "/api/requests/?type=praise",
        "application/json; charset=zlib_codec",
        b'{"content": "x"}',
        400,
    ),
    "idna on multipart": (
        "POST",
        "/api/requests/",
        "multipart/form-data; boundary=b; charset=idna",
        b'--b\r\nContent-Disposition: form-data; name="content"\r\n\r\nx\r\n--b--\r\n',
        400,
    ),
    "punycode on a form": (
        "POST",
        "/api/requests/",
        "application/x-www-form-urlencoded; charset=punycode",
        b"content=x",
        400,
    ),
}


@pytest.mark.parametrize("method, path, headers, body", NASTY.values(), ids=NASTY.keys())
def test_nasty_requests_are_4xx_in_json(web, staff_session, method, path, headers, body):
    if headers is AS_STAFF:
        headers = {**JSON, "X-CSRFToken": staff_session.cookies["csrftoken"]}
        response = staff_session.request(method, web + path, headers=headers, data=body, timeout=30)
    else:
        response = requests.request(method, web + path, headers=headers, data=body, timeout=30)
    assert 400 <= response.status_code < 500, response.text[:500]
    assert response.headers["Content-Type"] == "application/json", response.text[:500]


@pytest.mark.parametrize("method, path, content_type, body, status", ODD_CHARSETS.values(), ids=ODD_CHARSETS.keys())
def test_a_charset_that_decodes_no_text_is_ignored(web, method, path, content_type, body, status):
    response = requests.request(method, web + path, headers={"Content-Type": content_type}, data=body, timeout=30)
    assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"] == "application/json"


def test_basic_auth_is_off_in_production_and_the_staff_session_works(web, staff_session):
    response = requests.get(f"{web}/api/moderation/requests/", headers=basic_auth(*STAFF), timeout=30)
    assert response.status_code == 403
    response = staff_session.get(f"{web}/api/moderation/requests/", timeout=30)
    assert response.status_code == 200
    assert response.json()["count"] >= 4  # the seeded ones, and any the fuzzing submitted
