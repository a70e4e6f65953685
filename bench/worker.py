"""Item 2: `prodserver worker` against plain `celery -A prayer_room_api worker`, same ARGS and concurrency.

Both workers run side by side, each on a Redis db of its own; latency and throughput rounds alternate
between them (ABBA) and each ratio is the median over back-to-back pairs. Latency runs from
`apply_async` to the no-op `ping` task's result time (`date_done`, written the moment it returns):
an upper bound on the start latency, the same for both sides.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager

from bench.context import Context
from bench.procs import cpu_seconds
from bench.report import Result, paired
from bench.services import BIN, REDIS_DB, Command, cli_args, flush_redis, prodserver
from bench.stats import interleaved, percentile
from tests.support.stack import celery_app, redis_url

SIDES = ("prodserver", "celery")
REDIS_DBS = {"prodserver": REDIS_DB, "celery": REDIS_DB + 1}
PING = "prayer_room_api.tasks.ping"


def start(side: str, ctx: Context, log_dir) -> Command:
    from django.conf import settings

    env = {**ctx.env, "CELERY_BROKER_URL": f"{redis_url()}/{REDIS_DBS[side]}"}
    if side == "prodserver":
        return prodserver("worker", env, log_dir)
    args = cli_args(settings.PRODUCTION_PROCESSES["worker"]["ARGS"])
    return Command("celery", [str(BIN / "celery"), "-A", "prayer_room_api", "worker", *args], env, log_dir)


def client(side: str):
    """A Celery app that sends to and reads results from `side`'s Redis db (json, the project's serializer)."""
    url = f"{redis_url()}/{REDIS_DBS[side]}"
    return celery_app(url, main=f"bench-{side}", set_as_current=False)


@contextmanager
def own_brokers():
    """NOTE: Celery prefers $CELERY_BROKER_URL to any app's broker_url (celery/app/utils.py): hide it meanwhile."""
    saved = os.environ.pop("CELERY_BROKER_URL", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["CELERY_BROKER_URL"] = saved


def latencies(app, count: int) -> list[float]:
    """Milliseconds from sending each of `count` pings, one at a time, to its result time."""
    out = []
    for _ in range(count):
        sent = time.time()
        result = app.send_task(PING)
        result.get(timeout=30)
        out.append((result.date_done.timestamp() - sent) * 1000)
    return out


def throughput(app, count: int) -> float:
    """Tasks per second the worker drains from a burst of `count` pings (first to last result time)."""
    results = [app.send_task(PING) for _ in range(count)]
    for result in results:
        result.get(timeout=300)
    done = sorted(result.date_done.timestamp() for result in results)
    return (count - 1) / (done[-1] - done[0])


@contextmanager
def stopping(workers: dict[str, Command]):
    try:
        yield
    finally:
        for worker in workers.values():
            worker.stop()


def run(ctx: Context) -> Result:
    rounds, sequential, burst = (2, 50, 500) if ctx.quick else (6, 100, 2000)
    for db in REDIS_DBS.values():
        flush_redis(db)
    workers, apps = {}, {side: client(side) for side in SIDES}
    samples: dict[str, list[dict]] = {side: [] for side in SIDES}
    with own_brokers(), stopping(workers):
        for side in SIDES:
            workers[side] = start(side, ctx, ctx.logs("worker", side))
        for side in SIDES:
            workers[side].wait_for_output(" ready.", timeout=60)
            latencies(apps[side], 10)  # warm-up: pool processes, connections
        for _, side in interleaved(SIDES, rounds):
            lat = latencies(apps[side], sequential)
            sample = {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}
            cpu = cpu_seconds(workers[side].popen.pid)
            sample["tasks_per_s"] = throughput(apps[side], burst)
            sample["cpu_ms_per_task"] = (cpu_seconds(workers[side].popen.pid) - cpu) * 1000 / burst
            samples[side].append(sample)
    for side, worker in workers.items():  # each side must have run its own tasks
        received = len(set(re.findall(r"\[([0-9a-f-]{36})\] received", worker.output())))
        expected = 10 + rounds * (sequential + burst)
        if received != expected:
            raise RuntimeError(f"the {side} worker ran {received} tasks, not the {expected} sent to it")

    def series(side: str, key: str) -> list[float]:
        return [sample[key] for sample in samples[side]]

    def row(metric: str, unit: str, key: str):
        return paired(metric, unit, series("prodserver", key), series("celery", key))

    tput = row(f"throughput, {burst:,} no-op tasks", "tasks/s", "tasks_per_s")
    tput.target, tput.met = "ratio >= 0.97", tput.ratio >= 0.97
    cpu = row("worker CPU per task", "ms", "cpu_ms_per_task")
    cpu.target, cpu.met = "ratio <= 1.03", cpu.ratio <= 1 / 0.97
    p50 = row("apply_async to task p50", "ms", "p50_ms")
    p50.target, p50.met = "within 5 ms", p50.ours - p50.baseline <= 5
    p99 = row("apply_async to task p99", "ms", "p99_ms")
    params = {"rounds": rounds, "sequential_tasks": sequential, "burst_tasks": burst, "broker": "redis"}
    return Result("worker", [tput, cpu, p50, p99], params, {"samples": samples})
