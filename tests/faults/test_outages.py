"""web, worker and beat running while their private broker, cache and database stop and start again.

One stack for the module: PostgreSQL and two Redis servers of its own (broker, cache: so each can be down
alone), migrated once, the three processes started once. Each test leaves every service up again.
"""

import json
import re
import secrets
import time
import urllib.error
import urllib.request

import pytest
import requests

from tests.support import stack

from . import servers
from .conftest import report

AUTHOR = "author@faults.example"
STAFF = ("staff", "staff-password-1")
OUTBOX_RUN = re.compile(r"Task prayer_room_api\.tasks\.send_outbox\[[^\]]+\] succeeded")


class Stack:
    def __init__(self, tmp, pg, broker, cache):
        self.pg, self.broker, self.cache = pg, broker, cache
        self._staff: requests.Session | None = None
        self.port = stack.free_port()
        self.env = stack.production_env(
            stack.Database("unused"), 0, WORKER_CONCURRENCY="2", CELERY_TASK_TIME_LIMIT="20", PORT=str(self.port)
        )
        self.env.update(
            DATABASE_URL=pg.create_database("prayer_room"),
            CELERY_BROKER_URL=f"{broker.url}/0",
            CELERY_RESULT_BACKEND=f"{broker.url}/0",
            CACHE_URL=f"{cache.url}/1",
            CONN_MAX_AGE="0",
        )
        self.env["STATIC_ROOT"] = str(tmp / "static")
        stack.manage(self.env, "migrate", "--noinput")
        # The production settings name static files by their content hash (the admin login page needs them).
        stack.manage(self.env, "collectstatic", "--noinput")
        created = stack.manage(self.env, "shell", "-c", SEED.format(author=AUTHOR, user=STAFF[0], password=STAFF[1]))
        self.request_id = int(created.stdout.strip().splitlines()[-1])
        # Staff re-time the sweep, as they might in the admin: every 5 s instead of every minute.
        self.db("INSERT INTO django_celery_beat_intervalschedule (every, period) VALUES (5, 'seconds') RETURNING id")
        self.db(
            """UPDATE django_celery_beat_periodictask SET crontab_id = NULL,
               interval_id = (SELECT max(id) FROM django_celery_beat_intervalschedule) WHERE name = 'send-outbox'"""
        )
        self.db("UPDATE django_celery_beat_periodictasks SET last_update = now() WHERE ident = 1")
        self.web = stack.Process("web", self.env, tmp)
        self.worker = stack.Process("worker", self.env, tmp)
        self.beat = stack.Process("beat", self.env, tmp)
        self.web.wait_for_http(self.url("/health/"), 90)
        self.worker.wait_for_output("ready.", 90)
        self.beat.wait_for_output("took the leader lock", 90)

    def db(self, sql, params=()):
        return self.pg.query("prayer_room", sql, params)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def http(self, method, path, body=None, timeout=30):
        headers = {"Content-Type": "application/json"}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url(path), data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def health(self):
        return self.http("GET", "/health/")

    def wait_healthy(self, timeout=90):
        deadline = time.monotonic() + timeout
        while (answer := self.health())[0] != 200:
            assert time.monotonic() < deadline, f"/health/ still {answer} after {timeout} s"
            time.sleep(0.5)

    def staff_session(self) -> requests.Session:
        """A moderator signed in through the admin login (production has no Basic auth), made once."""
        if self._staff is None:
            session = requests.Session()
            session.get(self.url("/admin/login/"), timeout=30)
            answer = session.post(
                self.url("/admin/login/"),
                data={"username": STAFF[0], "password": STAFF[1], "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                timeout=30,
            )
            assert "sessionid" in session.cookies, answer.text[:500]
            self._staff = session
        return self._staff

    def respond(self, text):
        session = self.staff_session()
        answer = session.post(
            self.url(f"/api/moderation/requests/{self.request_id}/respond/"),
            json={"response": text},
            headers={"X-CSRFToken": session.cookies["csrftoken"]},
            timeout=30,
        )
        return answer.status_code, answer.json() if answer.content else None

    def emails(self, text) -> int:
        """Response emails with `text` the worker sent (the console backend prints each between dashed lines)."""
        return sum(f"To: {AUTHOR}" in block and text in block for block in self.worker.output().split("-" * 79))

    def stop(self):
        for process in (self.beat, self.worker, self.web):
            process.stop()


SEED = """
from django.contrib.auth import get_user_model
from prayer_room_api.models import Location, PrayerRequest
User = get_user_model()
User.objects.create_superuser("{user}", "staff@faults.example", "{password}")
author = User.objects.create_user("author", "{author}", "pw")
chapel = Location.objects.create(name="Chapel", slug="chapel")
print(PrayerRequest.objects.create(content="Please pray", location=chapel, author=author).pk)
"""


@pytest.fixture(scope="module")
def outage(services, tmp_path_factory):
    reason = servers.unavailable()
    if reason:
        pytest.skip(reason)
    pg = servers.PrivatePostgres().start()
    broker = servers.PrivateRedis("broker").start()
    cache = servers.PrivateRedis("cache").start()
    running = None
    try:
        running = Stack(tmp_path_factory.mktemp("outage"), pg, broker, cache)
        yield running
    finally:
        if running:
            running.stop()
        for server in (cache, broker, pg):
            server.remove()


def down_answer(outage):
    status, body = outage.health()
    report(f"/health/ while down: HTTP {status} {json.dumps(body['checks'])}")
    return status, body


def test_with_the_cache_down_health_says_so_and_rate_limited_endpoints_still_answer(outage):
    outage.cache.stop()
    try:
        status, body = down_answer(outage)
        assert status == 503
        assert body["checks"] == {"database": "ok", "cache": "unavailable", "broker": "ok"}
        assert set(body) == {"status", "release", "checks"}
        submitted = outage.http("POST", "/api/requests/", {"content": "during the outage", "location": "chapel"})
        assert submitted[0] == 201
        outage.web.wait_for_output("rate limit 'submit' not applied: the cache is unreachable", 10)
    finally:
        outage.cache.start()
    outage.wait_healthy()


def test_a_response_during_a_broker_outage_is_emailed_once_when_the_broker_is_back(outage):
    text = f"Answered while Redis was down {secrets.token_hex(4)}"
    outage.broker.stop()
    try:
        status, body = down_answer(outage)
        assert status == 503 and body["checks"]["broker"] == "unavailable"
        started = time.monotonic()
        assert outage.respond(text)[0] == 200
        report(f"respond while the broker is down: HTTP 200 in {time.monotonic() - started:.1f} s")
        outage.web.wait_for_output("not handed to the broker", 10)
        time.sleep(2)
        assert outage.emails(text) == 0
    finally:
        outage.broker.start()
    back = time.monotonic()
    outage.worker.wait_for(lambda: outage.emails(text) == 1, 150, "the response email after the outage")
    report(f"respond during a broker outage: emailed once, {time.monotonic() - back:.1f} s after Redis was back")
    runs = len(OUTBOX_RUN.findall(outage.worker.output()))
    outage.worker.wait_for(lambda: len(OUTBOX_RUN.findall(outage.worker.output())) >= runs + 2, 60, "two more sweeps")
    assert outage.emails(text) == 1
    assert outage.db("SELECT count(*) FROM prayer_room_api_outboxmessage WHERE done_at IS NULL") == [(0,)]
    outage.wait_healthy()


def test_the_worker_and_beat_carry_on_after_the_broker_restarts(outage):
    refused = outage.beat.output().count("send-outbox not sent")
    outage.broker.stop()
    try:
        outage.beat.wait_for(
            lambda: outage.beat.output().count("send-outbox not sent") > refused, 60, "a refused dispatch"
        )
    finally:
        outage.broker.start()
    outage.beat.wait_for_output("send-outbox sent after the broker came back", 60)
    app = stack.celery_app(outage.env["CELERY_BROKER_URL"], outage.env["CELERY_RESULT_BACKEND"])
    try:
        assert app.send_task("prayer_room_api.tasks.ping").get(timeout=90)["release"]
    finally:
        app.close()
    runs = len(OUTBOX_RUN.findall(outage.worker.output()))
    outage.worker.wait_for(lambda: len(OUTBOX_RUN.findall(outage.worker.output())) > runs, 60, "beat dispatching")


def test_a_database_restart_is_reported_and_every_process_recovers(outage):
    leads = outage.beat.output().count("took the leader lock")
    outage.pg.stop()
    try:
        status, body = down_answer(outage)
        assert status == 503 and body["checks"]["database"] == "unavailable"
        assert set(body) == {"status", "release", "checks"}
    finally:
        outage.pg.start()
    outage.wait_healthy()
    outage.beat.wait_for(lambda: outage.beat.output().count("took the leader lock") > leads, 60, "beat leading again")
    assert outage.beat.output().count("lost the leader lock's session") >= 1
    text = f"Answered after the database restart {secrets.token_hex(4)}"
    assert outage.respond(text)[0] == 200
    outage.worker.wait_for(lambda: outage.emails(text) == 1, 90, "the response email")
