"""web, worker and beat started through `manage.py prodserver` against PostgreSQL and Redis."""

import json
import re
import subprocess
import time

import pytest

from tests.support import stack

pytestmark = pytest.mark.integration


def test_list_names_the_three_processes_without_deprecation_noise(env):
    result = stack.manage(env, "prodserver", "--list")
    assert re.findall(r"^ (\w+)$", result.stdout, re.M) == ["web", "worker", "beat"]
    assert "Deprecat" not in result.stdout + result.stderr


def test_web_serves_the_project_on_port(start):
    port = stack.free_port()
    web = start("web", PORT=str(port), RELEASE="it-release")
    web.wait_for_http(f"http://127.0.0.1:{port}/health/")
    with stack.urllib.request.urlopen(f"http://127.0.0.1:{port}/health/") as response:
        checks = {"database": "ok", "cache": "ok", "broker": "ok"}
        assert json.load(response) == {"status": "ok", "release": "it-release", "checks": checks}
    assert stack.http_status(f"http://127.0.0.1:{port}/admin/login/") == 200
    assert "Deprecat" not in web.output()


def test_web_args_reach_gunicorn(start):
    port = stack.free_port()
    web = start("web", PORT=str(port), WEB_WORKERS="3", WEB_TIMEOUT="17", LOG_LEVEL="debug")
    web.wait_for_http(f"http://127.0.0.1:{port}/health/")

    def workers() -> set[str]:
        return set(subprocess.run(["pgrep", "-P", str(web.popen.pid)], capture_output=True, text=True).stdout.split())

    def booted() -> set[str]:
        return set(re.findall(r"Booting worker with pid: (\d+)", web.output()))

    web.wait_for(lambda: len(booted()) >= 3 and workers() == booted(), 30, "three gunicorn workers booted")
    assert len(booted()) == 3, "gunicorn booted more workers than WEB_WORKERS (one died and was replaced?)"
    configuration = web.output().split("Current configuration:", 1)[1]
    assert re.search(r"^ +workers: 3$", configuration, re.M) and re.search(r"^ +timeout: 17$", configuration, re.M)
    assert f"Listening at: http://127.0.0.1:{port}" in web.output()


def test_web_that_cannot_bind_exits_non_zero(start):
    port = stack.free_port()
    first = start("web", PORT=str(port))
    first.wait_for_http(f"http://127.0.0.1:{port}/health/")
    second = start("web", PORT=str(port))
    assert second.popen.wait(60) != 0


def test_worker_runs_a_task_sent_through_redis(start, celery_client):
    worker = start("worker", RELEASE="it-worker", WORKER_CONCURRENCY="3")
    worker.wait_for_output("ready.", timeout=60)
    result = celery_client.send_task("prayer_room_api.tasks.ping")
    assert result.get(timeout=30)["release"] == "it-worker"
    output = worker.output()
    assert re.search(r"concurrency:\s+3 \(prefork\)", output)
    assert "Deprecat" not in output
    assert worker.stop() == 0, "a warm shutdown on TERM exits 0"


def test_worker_that_cannot_start_exits_non_zero(start):
    worker = start("worker", CELERY_BROKER_URL="nosuchtransport://127.0.0.1:1/0")
    assert worker.popen.wait(60) != 0
    assert "nosuchtransport" in worker.output()


def test_upstream_commands_still_start_each_process(env, start, tmp_path):
    port = stack.free_port()
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [stack.sys.executable, str(stack.MANAGE), "server", "web"],
        env={**env, "PORT": str(port)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while stack.http_status(f"http://127.0.0.1:{port}/health/") != 200:
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(30)
    help_text = stack.manage(env, "worker", "--list").stdout
    assert "worker" in help_text and "beat" in help_text


def add_interval_task(database, name: str, task: str) -> None:
    """A periodic task every second, saved the way beat notices (the PeriodicTasks stamp bumped)."""
    database.query("INSERT INTO django_celery_beat_intervalschedule (every, period) VALUES (1, 'seconds')")
    (interval_id,) = database.query("SELECT max(id) FROM django_celery_beat_intervalschedule")[0]
    database.query(
        """INSERT INTO django_celery_beat_periodictask
           (name, task, args, kwargs, enabled, interval_id, total_run_count, date_changed, description,
            one_off, headers)
           VALUES (%s, %s, '[]', '{}', true, %s, 0, now(), '', false, '{}')""",
        (name, task, interval_id),
    )
    database.query("UPDATE django_celery_beat_periodictasks SET last_update = now() WHERE ident = 1")


def test_beat_dispatches_a_due_task_the_worker_runs_and_stops_when_disabled(start, database):
    add_interval_task(database, "it-ping", "prayer_room_api.tasks.ping")
    # A control beside it: beat keeps sending this one, which shows it went on running after the change.
    add_interval_task(database, "it-control", "prayer_room_api.tasks.send_outbox")
    worker = start("worker")
    beat = start("beat")
    worker.wait_for_output("ready.", timeout=60)
    succeeded = re.compile(r"Task prayer_room_api\.tasks\.ping\[[^\]]+\] succeeded")
    worker.wait_for(lambda: len(succeeded.findall(worker.output())) >= 2, 60, "two beat-sent pings executed")
    assert "DatabaseScheduler" in beat.output()
    assert "maxinterval -> 5.00 seconds" in beat.output(), "the beat ARGS reached celery"

    before_change = len(beat.output())
    database.query("UPDATE django_celery_beat_periodictask SET enabled = false WHERE name = 'it-ping'")
    database.query("UPDATE django_celery_beat_periodictasks SET last_update = now() WHERE ident = 1")

    def since_reload() -> str:
        """What beat logged once it noticed the change (and reloaded its schedule), or "" before that."""
        after = beat.output()[before_change:]
        return after.split("DatabaseScheduler: Schedule changed.", 1)[1] if "Schedule changed." in after else ""

    # Four sends of a 1 s control span more than the disabled task's interval: had beat kept it, it would be sent.
    beat.wait_for(lambda: since_reload().count("Sending due task it-control ") >= 4, 30, "the reload, then 4 controls")
    assert "Sending due task it-ping " not in since_reload(), "beat kept sending a disabled task"
    sent = beat.output().count("Sending due task it-ping ")
    worker.wait_for(lambda: len(succeeded.findall(worker.output())) >= sent, 30, "every ping beat sent executed")
    assert len(succeeded.findall(worker.output())) == sent


def test_beat_loads_the_seeded_schedules_from_the_database(start, database):
    """The hourly digest is in beat's schedule; a daily one joins when its hour comes near.

    NOTE: django-celery-beat 2.8+ loads a crontab with a numeric hour only within about
    2 hours of it (schedulers.py, _get_crontab_exclude_query), so 08:00 digests appear
    in the schedule from 06:00; moving one to this hour, as staff might, loads it at once.
    """
    beat = start("beat", LOG_LEVEL="debug")
    beat.wait_for_output("<ModelEntry: moderator-digest-hourly prayer_room_api.tasks.send_moderator_digest", 60)
    database.query(
        """UPDATE django_celery_beat_crontabschedule SET hour = extract(hour from now() at time zone 'UTC')::text
           WHERE id = (SELECT crontab_id FROM django_celery_beat_periodictask WHERE name = 'user-digest-daily')"""
    )
    database.query("UPDATE django_celery_beat_periodictasks SET last_update = now() WHERE ident = 1")
    beat.wait_for_output("<ModelEntry: user-digest-daily prayer_room_api.tasks.send_user_digest(*['daily']", 30)
