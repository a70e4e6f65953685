"""Item 2: `prodserver worker` against plain `celery -A prayer_room_api worker`, same ARGS and concurrency.

Latency is from `apply_async` to the no-op `ping` task's result time (`date_done`, written the moment the
task returns): an upper bound on the start latency, the same for both sides.
"""

from __future__ import annotations

import time

from bench.context import Context
from bench.report import Result, Row
from bench.services import BIN, Command, cli_args, flush_redis, prodserver
from bench.stats import interleaved, median, percentile

SIDES = ("prodserver", "celery")


def start(side: str, ctx: Context, log_dir) -> Command:
    from django.conf import settings

    if side == "prodserver":
        worker = prodserver("worker", ctx.env, log_dir)
    else:
        args = cli_args(settings.PRODUCTION_PROCESSES["worker"]["ARGS"])
        worker = Command("celery", [str(BIN / "celery"), "-A", "prayer_room_api", "worker", *args], ctx.env, log_dir)
    worker.wait_for_output(" ready.", timeout=60)
    return worker


def latencies(count: int) -> list[float]:
    """Milliseconds from sending each of `count` pings, one at a time, to its result time."""
    from prayer_room_api.tasks import ping

    out = []
    for _ in range(count):
        sent = time.time()
        result = ping.apply_async()
        result.get(timeout=30)
        out.append((result.date_done.timestamp() - sent) * 1000)
    return out


def throughput(count: int) -> float:
    """Tasks per second the worker drains from a burst of `count` pings (first to last result time)."""
    from prayer_room_api.tasks import ping

    results = [ping.apply_async() for _ in range(count)]
    for result in results:
        result.get(timeout=300)
    done = sorted(result.date_done.timestamp() for result in results)
    return (count - 1) / (done[-1] - done[0])


def run(ctx: Context) -> Result:
    repeats, sequential, burst = (2, 50, 500) if ctx.quick else (5, 200, 2000)
    samples: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat, side in interleaved(SIDES, repeats):
        flush_redis()
        worker = start(side, ctx, ctx.logs("worker", f"{repeat}-{side}"))
        try:
            latencies(10)  # warm-up: pool processes, connections
            lat = latencies(sequential)
            samples[side].append(
                {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "tasks_per_s": throughput(burst)}
            )
        finally:
            worker.stop()

    def med(side: str, key: str) -> float:
        return median([sample[key] for sample in samples[side]])

    tput = Row(f"throughput, {burst:,} no-op tasks", med("prodserver", "tasks_per_s"), "tasks/s")
    tput.baseline = med("celery", "tasks_per_s")
    tput.target, tput.met = "ratio >= 0.97", tput.ratio >= 0.97
    p50 = Row("apply_async to task p50", med("prodserver", "p50_ms"), "ms", med("celery", "p50_ms"))
    p50.target, p50.met = "within 5 ms", p50.ours - p50.baseline <= 5
    p99 = Row("apply_async to task p99", med("prodserver", "p99_ms"), "ms", med("celery", "p99_ms"))
    params = {"repeats": repeats, "sequential_tasks": sequential, "burst_tasks": burst, "broker": "redis"}
    return Result("worker", [tput, p50, p99], params, {"samples": samples})
