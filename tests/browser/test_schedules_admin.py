"""Staff manage the periodic schedules in Django Admin, in chromium, against running web, worker and beat."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from tests.browser.admin_pages import (
    PERIODIC_TASKS,
    changelist_row,
    run_list_action,
    save_enabled_on_change_form,
    sign_in,
    submit,
)

pytestmark = pytest.mark.browser

SEEDED = {
    "moderator-digest-hourly": ("prayer_room_api.tasks.send_moderator_digest", "Every hour UTC"),
    "user-digest-daily": ("prayer_room_api.tasks.send_user_digest", "At 08:00 AM UTC"),
    "user-digest-weekly": ("prayer_room_api.tasks.send_user_digest", "At 08:00 AM, only on Monday UTC"),
}
BEAT_MAX_INTERVAL = 5.0
# Beyond beat's maximum interval: the admin's commit, then the test's polling (every 0.2 s) on a busy machine.
RELOAD_MARGIN = 2.0
SCHEDULE_CHANGED = "DatabaseScheduler: Schedule changed."
CONTROL_SENT = "Sending due task test-control ("
LOGGED_AT = r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
PING_SUCCEEDED = re.compile(LOGGED_AT + r".*Task prayer_room_api\.tasks\.ping\[[^\]]+\] succeeded", re.MULTILINE)
STAFF_PING_SENT = re.compile(LOGGED_AT + r".*Sending due task staff-ping \(", re.MULTILINE)


def enabled_in_database(admin_stack, name: str) -> bool:
    return admin_stack.database.query("SELECT enabled FROM django_celery_beat_periodictask WHERE name = %s", (name,))[
        0
    ][0]


def schedule_change_stamp(admin_stack):
    """The PeriodicTasks row beat polls to notice admin edits."""
    return admin_stack.database.query("SELECT last_update FROM django_celery_beat_periodictasks WHERE ident = 1")[0][0]


def logged_at(process, pattern: re.Pattern) -> list[datetime]:
    """When `process` logged each line matching `pattern` (local time, as logging writes it)."""
    return [datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f") for m in pattern.finditer(process.output())]


def test_the_admin_is_styled_by_the_stylesheets_the_app_itself_serves(page, admin_stack):
    """No route in the browser: /static/ comes from web (WhiteNoise), as for a user of `invoke dev`."""
    static = []
    page.on("response", lambda response: "/static/" in response.url and static.append(response))
    page.goto("/admin/login/")
    page.wait_for_load_state("load")
    assert static and all(response.status == 200 for response in static), [(r.url, r.status) for r in static]
    assert any(re.search(r"/admin/css/base(\.\w+)?\.css$", response.url) for response in static)  # hashed or not
    header = page.eval_on_selector("#header", "e => getComputedStyle(e).backgroundColor")
    assert header not in ("rgba(0, 0, 0, 0)", "transparent"), "base.css not applied"


def test_staff_sees_the_seeded_schedules_in_words_with_their_tasks(staff_page):
    staff_page.goto(PERIODIC_TASKS)

    for name, (task, in_words) in SEEDED.items():
        row = changelist_row(staff_page, name)
        assert row.count() == 1, f"{name} is not listed"
        assert row.locator("td.field-task").inner_text().strip() == task
        assert row.locator("td.field-schedule_in_words").inner_text().strip() == in_words
        assert row.locator("td.field-enabled img").get_attribute("alt") == "True"
    headers = [h.strip().lower() for h in staff_page.locator("#result_list thead th").all_inner_texts()]
    assert headers[1:] == ["name", "task name", "schedule", "enabled", "last run"]

    changelist_row(staff_page, "user-digest-weekly").locator("th.field-name a").click()
    assert "Mondays at 08:00" in staff_page.input_value("#id_description")


def test_list_action_disables_then_enables_the_moderator_digest(staff_page, admin_stack):
    name = "moderator-digest-hourly"
    stamp = schedule_change_stamp(admin_stack)

    message = run_list_action(staff_page, "disable_tasks", name)
    assert "1 task was successfully disabled" in message
    assert enabled_in_database(admin_stack, name) is False
    assert changelist_row(staff_page, name).locator("td.field-enabled img").get_attribute("alt") == "False"
    assert schedule_change_stamp(admin_stack) > stamp, "beat would not notice the change"

    message = run_list_action(staff_page, "enable_tasks", name)
    assert "1 task was successfully enabled" in message
    assert enabled_in_database(admin_stack, name) is True
    assert changelist_row(staff_page, name).locator("td.field-enabled img").get_attribute("alt") == "True"


def test_change_form_disables_then_enables_the_moderator_digest(staff_page, admin_stack):
    name = "moderator-digest-hourly"
    stamp = schedule_change_stamp(admin_stack)

    assert "was changed successfully" in save_enabled_on_change_form(staff_page, name, enabled=False)
    assert enabled_in_database(admin_stack, name) is False
    assert schedule_change_stamp(admin_stack) > stamp, "beat would not notice the change"

    assert "was changed successfully" in save_enabled_on_change_form(staff_page, name, enabled=True)
    assert enabled_in_database(admin_stack, name) is True


def test_task_staff_create_runs_on_the_worker_and_stops_once_disabled(staff_page, admin_stack):
    page, worker = staff_page, admin_stack.worker
    page.goto("/admin/django_celery_beat/intervalschedule/add/")
    page.fill("#id_every", "2")
    page.select_option("#id_period", "seconds")
    submit(page, "input[name=_save]")
    page.goto("/admin/django_celery_beat/periodictask/add/")
    page.fill("#id_name", "staff-ping")
    page.select_option("#id_regtask", "prayer_room_api.tasks.ping")
    page.select_option("#id_interval", label="every 2 seconds")
    submit(page, "input[name=_save]")
    assert "was added successfully" in page.locator("ul.messagelist").inner_text()

    worker.wait_for(lambda: len(logged_at(worker, PING_SUCCEEDED)) >= 3, 30, "three pings executed")

    def runs() -> int:
        sql = "SELECT total_run_count FROM django_celery_beat_periodictask WHERE name = 'staff-ping'"
        return admin_stack.database.query(sql)[0][0]

    # Beat writes the count when it syncs, after the dispatch the worker may already have run.
    admin_stack.beat.wait_for(lambda: runs() >= 3, 15, "the dispatches recorded in total_run_count")
    page.goto(PERIODIC_TASKS)
    assert changelist_row(page, "staff-ping").locator("td.field-last_run").inner_text().strip() != "-"

    beat, database = admin_stack.beat, admin_stack.database
    # A control beside it: beat keeps sending this one, which shows it went on running after the change.
    database.query("INSERT INTO django_celery_beat_intervalschedule (every, period) VALUES (1, 'seconds')")
    database.query(
        """INSERT INTO django_celery_beat_periodictask
           (name, task, args, kwargs, enabled, interval_id, total_run_count, date_changed, description,
            one_off, headers)
           SELECT 'test-control', 'prayer_room_api.tasks.send_outbox', '[]', '{}', true, max(id), 0, now(), '',
                  false, '{}' FROM django_celery_beat_intervalschedule"""
    )
    database.query("UPDATE django_celery_beat_periodictasks SET last_update = now() WHERE ident = 1")
    try:
        beat.wait_for(lambda: CONTROL_SENT in beat.output(), 30, "the control task sent")
        before_disable = len(beat.output())
        disabled_at = datetime.now()
        assert "1 task was successfully disabled" in run_list_action(page, "disable_tasks", "staff-ping")

        def after_disable() -> str:
            return beat.output()[before_disable:]

        def since_reload() -> str:
            """What beat logged once it noticed the change (and reloaded its schedule), or "" before that."""
            return after_disable().split(SCHEDULE_CHANGED, 1)[1] if SCHEDULE_CHANGED in after_disable() else ""

        beat.wait_for(lambda: SCHEDULE_CHANGED in after_disable(), BEAT_MAX_INTERVAL + RELOAD_MARGIN, "the reload")
        reloaded_at = datetime.now()
        # Four sends of a 1 s control span more than staff-ping's 2 s: had beat kept it, it would be sent.
        beat.wait_for(lambda: since_reload().count(CONTROL_SENT) >= 4, 30, "four controls sent after the reload")
        assert "Sending due task staff-ping (" not in since_reload(), "beat kept sending a task staff disabled"
        sent = logged_at(beat, STAFF_PING_SENT)
        worker.wait_for(lambda: len(logged_at(worker, PING_SUCCEEDED)) >= len(sent), 30, "every sent ping executed")
        assert len(logged_at(worker, PING_SUCCEEDED)) == len(sent), "the worker ran a ping beat did not send"
        last_sent = (sent[-1] - disabled_at).total_seconds()
        print(
            f"\nafter Disable: beat reloaded the schedule {(reloaded_at - disabled_at).total_seconds():+.2f} s"
            f" (seen by the test), last sent staff-ping {last_sent:+.2f} s"
        )
    finally:
        database.query("DELETE FROM django_celery_beat_periodictask WHERE name = 'test-control'")
        database.query("UPDATE django_celery_beat_periodictasks SET last_update = now() WHERE ident = 1")


def test_user_who_is_not_staff_cannot_reach_the_admin(page, admin_stack):
    sign_in(page, admin_stack.member)
    assert "for a staff account" in page.locator("p.errornote").inner_text()

    page.goto(PERIODIC_TASKS)
    assert page.url.startswith(f"{admin_stack.base_url}/admin/login/"), page.url
    assert page.locator("#result_list").count() == 0


def test_invalid_crontab_minute_shows_the_error_and_saves_nothing(staff_page, admin_stack):
    tables = ("django_celery_beat_crontabschedule", "django_celery_beat_periodictask")
    before = {table: admin_stack.count(table) for table in tables}
    page = staff_page
    page.goto("/admin/django_celery_beat/crontabschedule/add/")
    page.fill("#id_minute", "99")
    page.fill("#id_hour", "8")
    submit(page, "input[name=_save]")

    assert page.locator("p.errornote").is_visible()
    assert "'99', not in 0-59 for Minutes" in page.locator(".field-minute .errorlist").inner_text()
    assert page.url.endswith("/crontabschedule/add/")
    assert {table: admin_stack.count(table) for table in tables} == before
