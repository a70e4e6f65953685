"""Item 4: the daily user digest for 100, 1,000 and 10,000 opted-in users: time, queries, peak memory.

Each size is seeded once into a template database; every run gets a fresh copy of it (so nothing is
already claimed) and runs in a fresh process, with the locmem email backend or a local SMTP sink.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench.context import Context
from bench.report import Result, Row, paired
from bench.services import REPO, BenchDatabase, Command, bench_env, migrated
from bench.stats import interleaved, median
from tests.support.stack import free_port

BACKENDS = ("locmem", "smtp")


def child(env: dict[str, str], *args: str) -> str:
    argv = [sys.executable, "-m", "bench.digest_run", *args]
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"bench.digest_run {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def seeded_template(users: int) -> BenchDatabase:
    template = BenchDatabase(name=f"prayer_room_bench_digest_{users}").create()
    env = bench_env(template)
    migrated(template, env)
    child(env, "seed", str(users))
    return template


def measure(template: BenchDatabase, email_url: str) -> dict:
    copy = BenchDatabase().create_from(template)
    try:
        out = child(bench_env(copy, EMAIL_URL=email_url), "send")
    finally:
        copy.drop()
    return json.loads(next(line for line in out.splitlines() if line.startswith("BENCH_JSON ")).split(" ", 1)[1])


def run(ctx: Context) -> Result:
    sizes = (100, 1000) if ctx.quick else (100, 1000, 10000)
    port = free_port()
    sink = Command("smtp-sink", [sys.executable, "-m", "bench.smtp_sink", str(port)], ctx.env, ctx.logs("digests"))
    urls = {"locmem": "memorymail://", "smtp": f"smtp://127.0.0.1:{port}"}
    samples: dict[int, dict[str, list[dict]]] = {}
    try:
        sink.wait_for_output("ready", timeout=30)
        for users in sizes:
            template = seeded_template(users)
            try:
                repeats = 1 if ctx.quick or users >= 10000 else 3
                samples[users] = {backend: [] for backend in BACKENDS}
                for _, backend in interleaved(BACKENDS, repeats):
                    sample = measure(template, urls[backend])
                    if sample["sent"] != users:
                        raise RuntimeError(f"{users} users opted in but {sample['sent']} digests went out")
                    samples[users][backend].append(sample)
            finally:
                template.drop()
    finally:
        sink.stop()

    def med(users: int, backend: str, key: str) -> float:
        return median([sample[key] for sample in samples[users][backend]])

    rows = []
    for users in sizes:
        times = [[sample["seconds"] for sample in samples[users][backend]] for backend in ("smtp", "locmem")]
        smtp = paired(f"{users:,} users: wall, SMTP sink vs locmem", "s", *times)
        smtp.target, smtp.met = "ratio <= 2", smtp.ratio <= 2
        cpu = [[sample["cpu_seconds"] for sample in samples[users][backend]] for backend in ("smtp", "locmem")]
        cpu_row = paired(f"{users:,} users: task CPU, SMTP sink vs locmem", "s", *cpu)
        locmem = Row(f"{users:,} users: wall, locmem", smtp.baseline, "s")
        if users == 10000:
            locmem.target, locmem.met = "<= 60 s", locmem.ours <= 60
        rows += [
            locmem,
            smtp,
            cpu_row,
            Row(f"{users:,} users: SQL queries", med(users, "locmem", "queries")),
            Row(f"{users:,} users: RSS before the run", med(users, "locmem", "rss_before_mb"), "MB"),
            Row(f"{users:,} users: peak RSS in the run, locmem", med(users, "locmem", "peak_rss_mb"), "MB"),
            Row(f"{users:,} users: peak RSS in the run, SMTP sink", med(users, "smtp", "peak_rss_mb"), "MB"),
        ]
    queries = {samples[u][b][i]["queries"] for u in sizes for b in BACKENDS for i in range(len(samples[u][b]))}
    rows.append(Row("SQL queries across sizes (distinct counts)", len(queries), target="1", met=len(queries) == 1))
    small, large = sizes[-2], sizes[-1]
    per_user = Row(
        f"time per user, {large:,} vs {small:,} users",
        med(large, "locmem", "seconds") / large * 1000,
        "ms",
        med(small, "locmem", "seconds") / small * 1000,
    )
    per_user.target, per_user.met = "ratio <= 1.5 (linear)", per_user.ratio <= 1.5
    rows.append(per_user)
    params = {"sizes": sizes, "task": "prayer_room_api.tasks.send_user_digest('daily')", "requests_per_user": 2}
    return Result("digests", rows, params, {"samples": {str(k): v for k, v in samples.items()}})
