"""Deploy timings on a loopback target (sshd, supervisord, nginx, PostgreSQL, Redis), side by side in one run.

First deploy, no-op redeploy, code-only redeploy and rollback (wall seconds of `fab`), and failed
requests through nginx during redeploys, against a naive `supervisorctl restart` of both web programs.
Run alone with `python -m bench.deploy [--quick]`, or as the suite's `deploy` item.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Result, Row, table, write
from bench.stats import median
from tests.deploy.target import Clone, DeployTarget, RequestLoop, unavailable

REDIS_DB = 15  # the tests use 11-14, the other benchmarks 9-10
NOOP_TARGET_S = 10.0
CODE_TARGET_S = 15.0


def _timed_fab(target: DeployTarget, *args: str, log: list, **options) -> float:
    started = time.monotonic()
    result = target.fab(*args, **options)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"fab {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    lines = result.stdout.splitlines()
    log.append(lines[next((i for i, line in enumerate(lines) if " is live in " in line), 0) :])
    return seconds


def _under_load(target: DeployTarget, action, posts) -> tuple[float, int, int]:
    """Run `action` under a steady request loop (GET /health/, POST a request, POST prayed) through the nginx
    site provision renders: (seconds, failed requests, requests)."""
    with RequestLoop(target.front_url, posts=posts) as loop:
        time.sleep(0.5)
        seconds = action()
        time.sleep(0.5)
    return seconds, len(loop.failures), loop.ok + loop.posted + len(loop.failures)


def _restart_both_web(target: DeployTarget) -> float:
    started = time.monotonic()
    target.supervisorctl("restart", "prayer-room:web-1", "prayer-room:web-2")
    return time.monotonic() - started


def measure(workdir: Path, repeats: int) -> Result:
    target = DeployTarget(workdir, redis_db=REDIS_DB).start()
    raw: dict[str, list] = {
        "noop": [],
        "code": [],
        "rollback": [],
        "failed": [],
        "requests": [],
        "naive_failed": [],
        "summaries": [],
    }
    try:
        clone = Clone(workdir / "repo")
        first = _timed_fab(target, "deploy", repo=clone.path, log=raw["summaries"])
        posts = target.api_posts()
        for n in range(repeats):
            seconds, failed, total = _under_load(
                target, lambda: _timed_fab(target, "deploy", repo=clone.path, log=raw["summaries"]), posts
            )
            raw["noop"].append(seconds)
            raw["failed"].append(failed)
            raw["requests"].append(total)
            clone.commit_file("docs/bench-marker.txt", f"{n} {time.time()}\n", "bench: a code-only change")
            seconds, failed, total = _under_load(
                target, lambda: _timed_fab(target, "deploy", repo=clone.path, log=raw["summaries"]), posts
            )
            raw["code"].append(seconds)
            raw["failed"].append(failed)
            raw["requests"].append(total)
            seconds, failed, total = _under_load(
                target, lambda: _timed_fab(target, "rollback", log=raw["summaries"]), posts
            )
            raw["rollback"].append(seconds)
            raw["failed"].append(failed)
            raw["requests"].append(total)
            # What users would do without the rolling restart: restart both web programs at once.
            _, failed, _ = _under_load(target, lambda: _restart_both_web(target), posts)
            raw["naive_failed"].append(failed)
            time.sleep(3)  # the naive restart's programs finish starting
    finally:
        target.stop()
    rows = [
        Row("first deploy (venv built)", first, "s"),
        Row("no-op redeploy", median(raw["noop"]), "s", target=f"<= {NOOP_TARGET_S:.0f} s",
            met=median(raw["noop"]) <= NOOP_TARGET_S),
        Row("code-only redeploy", median(raw["code"]), "s", target=f"<= {CODE_TARGET_S:.0f} s",
            met=median(raw["code"]) <= CODE_TARGET_S),
        Row("rollback", median(raw["rollback"]), "s"),
        Row("failed requests during redeploys and rollbacks", sum(raw["failed"]), "req",
            baseline=sum(raw["naive_failed"]), target="0", met=sum(raw["failed"]) == 0),
        Row("requests served during them", sum(raw["requests"]), "req"),
    ]  # fmt: skip
    params = {"repeats": repeats, "target": "loopback sshd + supervisord + nginx", "baseline": "restart web-1 web-2"}
    return Result("deploy", rows=rows, params=params, raw={**raw, "first": first})


def run(ctx) -> Result:
    """The suite's entry point."""
    reason = unavailable()
    if reason:
        return Result("deploy", skipped=reason)
    workdir = Path(tempfile.mkdtemp(prefix="prayer-room-bench-deploy-"))
    try:
        return measure(workdir, repeats=1 if ctx.quick else 3)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    from types import SimpleNamespace

    result = run(SimpleNamespace(quick="--quick" in sys.argv[1:]))
    print(table([result]))
    print(f"wrote {write(result)}")
    sys.exit(1 if result.error else 0)
