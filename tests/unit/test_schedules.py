"""The declared schedules: seeded by migration, kept by seed_schedules without overwriting staff edits."""

import json
from datetime import UTC, datetime

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask, PeriodicTasks

from prayer_room_api import schedules

pytestmark = pytest.mark.django_db

EXPECTED = {
    "moderator-digest-hourly": ("prayer_room_api.tasks.send_moderator_digest", [], ("0", "*", "*")),
    "user-digest-daily": ("prayer_room_api.tasks.send_user_digest", ["daily"], ("0", "8", "*")),
    "user-digest-weekly": ("prayer_room_api.tasks.send_user_digest", ["weekly"], ("0", "8", "1")),
    "send-outbox": ("prayer_room_api.tasks.send_outbox", [], ("*", "*", "*")),
}


def test_the_migrations_seed_exactly_the_declared_schedules():
    tasks = {t.name: t for t in PeriodicTask.objects.select_related("crontab")}
    assert set(tasks) == set(EXPECTED)
    for name, (task, args, (minute, hour, day_of_week)) in EXPECTED.items():
        row = tasks[name]
        assert row.enabled
        assert (row.task, json.loads(row.args)) == (task, args)
        cron = row.crontab
        assert (cron.minute, cron.hour, cron.day_of_week, cron.day_of_month, cron.month_of_year) == (
            minute,
            hour,
            day_of_week,
            "*",
            "*",
        )
        assert str(cron.timezone) == settings.CELERY_TIMEZONE
        assert row.description


def test_seeding_again_changes_nothing():
    before = (PeriodicTask.objects.count(), CrontabSchedule.objects.count())
    assert schedules.seed() == []
    assert (PeriodicTask.objects.count(), CrontabSchedule.objects.count()) == before


def test_seed_schedules_keeps_what_staff_changed(capsys):
    PeriodicTask.objects.filter(name="moderator-digest-hourly").update(enabled=False)
    daily = PeriodicTask.objects.get(name="user-digest-daily")
    daily.crontab = CrontabSchedule.objects.create(minute="30", hour="9", timezone=settings.CELERY_TIMEZONE)
    daily.save()

    call_command("seed_schedules")

    assert not PeriodicTask.objects.get(name="moderator-digest-hourly").enabled
    daily.refresh_from_db()
    assert (daily.crontab.minute, daily.crontab.hour) == ("30", "9")
    assert "0 created, 4 already present" in capsys.readouterr().out


def test_check_reports_staff_changes_as_drift_without_failing(capsys):
    PeriodicTask.objects.filter(name="moderator-digest-hourly").update(enabled=False)
    weekly = PeriodicTask.objects.get(name="user-digest-weekly")
    weekly.crontab = CrontabSchedule.objects.create(
        minute="0", hour="8", day_of_week="0", timezone=settings.CELERY_TIMEZONE
    )
    weekly.save()

    call_command("seed_schedules", "--check")

    out = capsys.readouterr().out
    assert "disabled: moderator-digest-hourly" in out
    assert "changed: user-digest-weekly: day_of_week '0', declared '1'" in out


def test_check_fails_when_a_declared_schedule_is_missing_and_seeding_restores_only_it(capsys):
    PeriodicTask.objects.filter(name="user-digest-daily").delete()
    with pytest.raises(CommandError, match="user-digest-daily"):
        call_command("seed_schedules", "--check")
    assert "missing: user-digest-daily" in capsys.readouterr().out

    changed_before = PeriodicTasks.last_change()
    assert schedules.seed() == ["user-digest-daily"]
    assert schedules.drift().clean
    assert PeriodicTasks.last_change() > changed_before, "a running beat must be told"


def test_seeding_tolerates_duplicate_crontab_rows():
    PeriodicTask.objects.filter(name="moderator-digest-hourly").delete()
    for _ in range(2):
        CrontabSchedule.objects.create(minute="0", timezone=settings.CELERY_TIMEZONE)
    assert schedules.seed() == ["moderator-digest-hourly"]


def test_undeclared_tasks_are_reported():
    PeriodicTask.objects.create(
        name="staff-extra", task="prayer_room_api.tasks.ping", crontab=CrontabSchedule.objects.first()
    )
    assert schedules.drift().undeclared == ["staff-extra"]


def declared_rows() -> set[tuple]:
    return set(
        PeriodicTask.objects.filter(name__in=EXPECTED).values_list(
            "name", "task", "args", "enabled", "crontab__minute", "crontab__hour", "crontab__day_of_week"
        )
    )


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_the_seed_migration_is_reversible():
    seeded = declared_rows()
    assert len(seeded) == len(EXPECTED)
    call_command("migrate", "prayer_room_api", "0001", verbosity=0)
    assert not PeriodicTask.objects.filter(name__in=EXPECTED).exists()
    assert not CrontabSchedule.objects.filter(periodictask__isnull=True).exists()
    call_command("migrate", verbosity=0)
    assert declared_rows() == seeded


def test_fab_status_gets_each_schedule_on_one_line_with_its_last_run(capsys):
    from deploy.on_server import app_helper

    ran = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    PeriodicTask.objects.filter(name="user-digest-weekly").update(last_run_at=ran)
    PeriodicTask.objects.create(
        name="staff-every-minute",
        task="prayer_room_api.tasks.ping",
        interval=IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS),
    )
    assert app_helper.schedules(None) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out.splitlines()[-1])["schedules"]}
    assert rows["user-digest-weekly"]["schedule"] == "0 8 * * 1 (m/h/dM/MY/d) UTC"
    assert rows["user-digest-weekly"]["last_run"] == "2026-01-05 08:00:00 UTC"
    assert rows["moderator-digest-hourly"]["last_run"] == "never"
    assert rows["staff-every-minute"]["schedule"] == "every 60 seconds"
