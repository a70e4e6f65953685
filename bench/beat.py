"""Item 3: how punctually `prodserver beat` (DatabaseScheduler) sends, and how fast it honours a change.

A task's start is the `ping` result time a worker writes to Redis; the bench's Redis db holds only
these results, so every new result key is the task beat just sent.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta

from bench.context import Context
from bench.report import Result, Row
from bench.services import flush_redis, prodserver
from bench.stats import median

PING = "prayer_room_api.tasks.ping"


class Results:
    """Result times (epoch seconds) of tasks that finished since the last look."""

    def __init__(self):
        self.redis = flush_redis()
        self.seen: set[bytes] = set()

    def new(self) -> list[float]:
        times = []
        for key in self.redis.scan_iter(match="celery-task-meta-*", count=1000):
            if key not in self.seen:
                self.seen.add(key)
                times.append(datetime.fromisoformat(json.loads(self.redis.get(key))["date_done"]).timestamp())
        return sorted(times)

    def collect(self, seconds: float, until_first: bool = False) -> list[float]:
        deadline, times = time.time() + seconds, []
        while time.time() < deadline and not (until_first and times):
            times += self.new()
            time.sleep(0.05)
        return times


def due_delays(results: Results, count: int, lead: float) -> list[float]:
    """Seconds from each one-off clocked schedule's due time to its task's result."""
    from django.utils import timezone
    from django_celery_beat.models import ClockedSchedule, PeriodicTask

    delays = []
    for i in range(count):
        due = timezone.now() + timedelta(seconds=lead)
        clocked = ClockedSchedule.objects.create(clocked_time=due)
        PeriodicTask.objects.create(name=f"bench-due-{i}", task=PING, clocked=clocked, one_off=True)
        done = results.collect(lead + 15, until_first=True)
        delays.append(done[0] - due.timestamp() if done else float("inf"))
    return delays


def crontab_delay(results: Results) -> float:
    """Seconds from the next whole minute to the result of an every-minute crontab task."""
    from django.conf import settings
    from django.utils import timezone
    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    crontab = CrontabSchedule.objects.create(minute="*", timezone=settings.CELERY_TIMEZONE)
    task = PeriodicTask.objects.create(name="bench-crontab", task=PING, crontab=crontab)
    now = timezone.now()
    due = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    results.collect(0.1)
    done = [t for t in results.collect((due - now).total_seconds() + 15, until_first=True) if t >= due.timestamp()]
    task.delete()
    return done[0] - due.timestamp() if done else float("inf")


def change_delays(results: Results, window: float) -> dict[str, float]:
    """Seconds from saving a change to an every-second task until beat acts on it."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every_second = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    hourly = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.HOURS)
    task = PeriodicTask.objects.create(name="bench-every-second", task=PING, interval=every_second)
    if not results.collect(window, until_first=True):
        raise RuntimeError("beat never sent the every-second task")

    def change(**fields) -> float:
        for name, value in fields.items():
            setattr(task, name, value)
        results.collect(0.1)
        saved = time.time()
        task.save()  # through the model, as the admin does: its signal bumps PeriodicTasks
        return saved

    def stops(**fields) -> float:
        if not results.collect(2.5, until_first=True):
            raise RuntimeError("the every-second task was not running before the change")
        saved = change(**fields)
        after = [t for t in results.collect(window) if t > saved]
        return (after[-1] - saved) if after else 0.0

    def starts(**fields) -> float:
        saved = change(**fields)
        after = [t for t in results.collect(window, until_first=True) if t > saved]
        return (after[0] - saved) if after else float("inf")

    out = {
        "disable": stops(enabled=False),
        "enable": starts(enabled=True),
        "edit to hourly": stops(interval=hourly),
        "edit to every second": starts(interval=every_second),
    }
    task.delete()
    return out


def run(ctx: Context) -> Result:
    from django.conf import settings

    max_interval = settings.BEAT_MAX_INTERVAL
    repeats, due_samples = (1, 2) if ctx.quick else (3, 5)
    results = Results()
    log_dir = ctx.logs("beat")
    worker = prodserver("worker", ctx.env, log_dir)
    beat = prodserver("beat", ctx.env, log_dir)
    try:
        worker.wait_for_output(" ready.", timeout=60)
        beat.wait_for_output("beat: Starting", timeout=60)
        due = due_delays(results, due_samples, lead=max_interval + 3)
        cron = None if ctx.quick else crontab_delay(results)
        changes = [change_delays(results, window=max_interval + 4) for _ in range(repeats)]
    finally:
        beat.stop()
        worker.stop()
    limit = max_interval + 1
    rows = [Row("due to task start, clocked (max)", max(due), "s", target="<= 1 s", met=max(due) <= 1)]
    rows.append(Row("due to task start, clocked (median)", median(due), "s"))
    if cron is not None:
        rows.append(Row("due to task start, every-minute crontab", cron, "s", target="<= 1 s", met=cron <= 1))
    for kind in changes[0]:
        worst = max(sample[kind] for sample in changes)
        rows.append(Row(f"change honoured: {kind} (max)", worst, "s", target=f"<= {limit} s", met=worst <= limit))
    params = {"beat_max_interval_s": max_interval, "due_samples": due_samples, "change_repeats": repeats}
    return Result("beat", rows, params, {"due_s": due, "crontab_s": cron, "changes_s": changes})
