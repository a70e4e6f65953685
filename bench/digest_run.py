"""One digest measurement in a fresh process, so peak memory is the run's own.

`python -m bench.digest_run seed N` fills the database in DATABASE_URL with N opted-in users;
`python -m bench.digest_run send` runs the daily user digest once and prints its figures as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Start the peak RSS (VmHWM) afresh, so it shows the run and not the start-up (Linux clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def send() -> dict:
    from django.db import connection

    from prayer_room_api.tasks import send_user_digest

    queries = 0

    def count(execute, sql, params, many, context):
        nonlocal queries
        queries += 1
        return execute(sql, params, many, context)

    connection.ensure_connection()
    before = status_mb("VmRSS")
    reset_peak()
    with connection.execute_wrapper(count):
        started, cpu = time.perf_counter(), time.process_time()
        summary = send_user_digest("daily")  # the task body, in this one process
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = status_mb("VmHWM")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "queries": queries,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        **summary,
    }


if __name__ == "__main__":
    import django

    django.setup()
    if sys.argv[1] == "seed":
        from bench.fixtures import digest_users

        digest_users(int(sys.argv[2]))
    else:
        print("BENCH_JSON " + json.dumps(send()), flush=True)
