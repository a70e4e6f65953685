"""The periodic schedules beat runs, declared once and seeded into django-celery-beat's tables.

Seeding creates what is missing and never overwrites a row: staff own the schedules once
they exist (an admin who disables or re-times a task keeps that change across deploys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import timezone


@dataclass(frozen=True)
class Schedule:
    name: str
    task: str
    crontab: dict[str, str]
    description: str
    args: tuple = ()

    def crontab_fields(self) -> dict[str, str]:
        """All five crontab fields, '*' where the declaration leaves one out."""
        fields = dict.fromkeys(("minute", "hour", "day_of_week", "day_of_month", "month_of_year"), "*")
        fields.update(self.crontab)
        return fields


SCHEDULES: tuple[Schedule, ...] = (
    Schedule(
        name="moderator-digest-hourly",
        task="prayer_room_api.tasks.send_moderator_digest",
        crontab={"minute": "0"},
        description="Every hour: emails staff the requests waiting for moderation and those flagged, "
        "when anything is new since the last digest.",
    ),
    Schedule(
        name="user-digest-daily",
        task="prayer_room_api.tasks.send_user_digest",
        crontab={"minute": "0", "hour": "8"},
        args=("daily",),
        description="Daily at 08:00: emails users who chose a daily digest the responses and prayer "
        "counts on their own requests since their last digest.",
    ),
    Schedule(
        name="user-digest-weekly",
        task="prayer_room_api.tasks.send_user_digest",
        crontab={"minute": "0", "hour": "8", "day_of_week": "1"},
        args=("weekly",),
        description="Mondays at 08:00: the same digest for users who chose a weekly one.",
    ),
    Schedule(
        name="send-outbox",
        task="prayer_room_api.tasks.send_outbox",
        crontab={"minute": "*"},
        description="Every minute: hands the broker the tasks the web saved but could not send (a broker "
        "outage), such as response emails; each email still goes out once.",
    ),
)


@dataclass
class Drift:
    """How the database differs from the declaration."""

    missing: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)
    undeclared: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.changed or self.disabled or self.undeclared)

    def lines(self) -> list[str]:
        out = [f"missing: {name} (run `manage.py seed_schedules`)" for name in self.missing]
        for name, diffs in self.changed.items():
            out += [f"changed: {name}: {diff}" for diff in diffs]
        out += [f"disabled: {name}" for name in self.disabled]
        out += [f"not declared: {name}" for name in self.undeclared]
        return out


def _models(apps):
    if apps is None:
        from django.apps import apps
    get = apps.get_model
    return (
        get("django_celery_beat", "PeriodicTask"),
        get("django_celery_beat", "CrontabSchedule"),
        get("django_celery_beat", "PeriodicTasks"),
    )


def _timezone() -> str:
    return settings.CELERY_TIMEZONE


def seed(apps=None, schedules=SCHEDULES) -> list[str]:
    """Create every declared periodic task that does not exist; return the names created.

    `apps` is a migration's app registry (historical models) or None for the live models.
    """
    PeriodicTask, CrontabSchedule, PeriodicTasks = _models(apps)
    tz = _timezone()
    existing = set(PeriodicTask.objects.filter(name__in=[s.name for s in schedules]).values_list("name", flat=True))
    created = []
    for schedule in schedules:
        if schedule.name in existing:
            continue
        fields = schedule.crontab_fields()
        # NOTE: CrontabSchedule has no unique constraint, so get_or_create can raise
        # MultipleObjectsReturned (django-celery-beat #841); take the first match instead.
        crontab = CrontabSchedule.objects.filter(timezone=tz, **fields).first()
        if crontab is None:
            crontab = CrontabSchedule.objects.create(timezone=tz, **fields)
        PeriodicTask.objects.create(
            name=schedule.name,
            task=schedule.task,
            crontab=crontab,
            args=json.dumps(list(schedule.args)),
            description=schedule.description,
            enabled=True,
        )
        created.append(schedule.name)
    if created:
        # NOTE: historical models and bulk writes send no signals; bump the row a running
        # DatabaseScheduler polls, or it keeps its old schedule for up to 5 minutes.
        PeriodicTasks.objects.update_or_create(ident=1, defaults={"last_update": timezone.now()})
    return created


def unseed(apps=None, schedules=SCHEDULES) -> None:
    """Remove the declared periodic tasks and crontabs left unused (reverses `seed`)."""
    PeriodicTask, CrontabSchedule, PeriodicTasks = _models(apps)
    PeriodicTask.objects.filter(name__in=[s.name for s in schedules]).delete()
    CrontabSchedule.objects.filter(periodictask__isnull=True).delete()
    PeriodicTasks.objects.update_or_create(ident=1, defaults={"last_update": timezone.now()})


def drift(apps=None, schedules=SCHEDULES) -> Drift:
    """Compare the database with the declaration, field by field."""
    PeriodicTask, _, _ = _models(apps)
    tz = _timezone()
    rows = {t.name: t for t in PeriodicTask.objects.select_related("crontab")}
    report = Drift()
    for schedule in schedules:
        row = rows.pop(schedule.name, None)
        if row is None:
            report.missing.append(schedule.name)
            continue
        diffs = []
        if row.task != schedule.task:
            diffs.append(f"task {row.task!r}, declared {schedule.task!r}")
        if json.loads(row.args or "[]") != list(schedule.args):
            diffs.append(f"args {row.args}, declared {json.dumps(list(schedule.args))}")
        if row.crontab is None:
            diffs.append("not a crontab schedule")
        else:
            for key, declared in schedule.crontab_fields().items():
                actual = getattr(row.crontab, key)
                if actual != declared:
                    diffs.append(f"{key} {actual!r}, declared {declared!r}")
            if str(row.crontab.timezone) != tz:
                diffs.append(f"timezone {row.crontab.timezone}, declared {tz}")
        if diffs:
            report.changed[schedule.name] = diffs
        if not row.enabled:
            report.disabled.append(schedule.name)
    report.undeclared = sorted(name for name in rows if not name.startswith("celery."))
    return report
