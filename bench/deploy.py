"""Deploy timings on a loopback target (sshd, supervisord, nginx, PostgreSQL, Redis), side by side in one run.

First deploy, no-op redeploy, code-only redeploy and rollback (wall seconds of `fab`), and failed
requests through nginx during redeploys, against a naive `supervisorctl restart` of both web programs.
Run alone with `python -m bench.deploy [--quick]`, or as the suite's `deploy` item.

`python -m bench.deploy --against REV [--quick]` measures the kit (fabfile.py and deploy/) of commit REV against
this one in the same run: each one's first deploy on a fresh target, then the redeploys and rollbacks back to
back on one target, the order of the two flipped every repeat; the ratio is this kit's over REV's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from bench.report import Result, Row, paired, table, write
from bench.stats import interleaved, median
from tests.deploy.target import REPO, Clone, DeployTarget, RequestLoop, unavailable

REDIS_DB = 15  # the tests use 11-14, the other benchmarks 9-10
NOOP_TARGET_S = 10.0
CODE_TARGET_S = 15.0


def _timed_fab(target: DeployTarget, *args: str, log: list, **options) -> float:
    """Wall seconds of one `fab` command (options: fab_argv's), which must succeed; its summary goes to `log`."""
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


def checkout_kit(rev: str, into: Path) -> Path:
    """fabfile.py, deploy/ and the supervisord template of commit `rev` in directory `into` (what `fab -r` loads)."""
    into.mkdir(parents=True)
    kit = ["fabfile.py", "deploy", "supervisord.conf.j2"]
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, *kit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure_against(workdir: Path, repeats: int, rev: str) -> Result:
    """The kit of `rev` ("before") and this one ("after") in one run; see the module's docstring."""
    workdir.chmod(0o755)  # the targets' server roots below it: the app user must reach them
    kits = {"before": checkout_kit(rev, workdir / "kit-before"), "after": REPO}
    raw: dict[str, dict[str, list]] = {side: {k: [] for k in ("first", "noop", "code", "rollback")} for side in kits}
    failed = {side: 0 for side in kits}
    requests = {side: 0 for side in kits}
    summaries: list = []
    target = None
    try:
        for side in ("before", "after"):  # the first deploy: on a fresh target each
            if target is not None:
                target.stop()
            target = DeployTarget(workdir / f"target-{side}", redis_db=REDIS_DB).start()
            clone = Clone(workdir / f"repo-{side}")
            raw[side]["first"].append(_timed_fab(target, "deploy", repo=clone.path, kit=kits[side], log=summaries))
        posts = target.api_posts()
        for n, side in interleaved(("before", "after"), repeats):
            for metric in ("noop", "code", "rollback"):
                if metric == "code":
                    clone.commit_file("docs/bench-marker.txt", f"{n} {side}\n", "bench: a code-only change")
                if metric == "rollback":
                    command = partial(_timed_fab, target, "rollback", kit=kits[side], log=summaries)
                else:
                    command = partial(_timed_fab, target, "deploy", repo=clone.path, kit=kits[side], log=summaries)
                seconds, failures, total = _under_load(target, command, posts)
                raw[side][metric].append(seconds)
                failed[side] += failures
                requests[side] += total
    finally:
        if target is not None:
            target.stop()
    after, before = raw["after"], raw["before"]
    rows = [
        paired(f"{label} (this kit vs {rev})", "s", after[key], before[key])
        for label, key in (
            ("first deploy (venv built)", "first"),
            ("no-op redeploy", "noop"),
            ("code-only redeploy", "code"),
            ("rollback", "rollback"),
        )
    ]
    code = rows[2]
    code.target, code.met = "<= 1.0x of before", code.ratio <= 1.0
    rows.append(
        Row("failed requests during redeploys and rollbacks", failed["after"], "req", baseline=failed["before"],
            target="0", met=failed["after"] == 0)
    )  # fmt: skip
    rows.append(Row("requests served during them", requests["after"], "req", baseline=requests["before"]))
    params = {"repeats": repeats, "target": "loopback sshd + supervisord + nginx", "baseline": f"the kit of {rev}"}
    return Result("deploy-against", rows=rows, params=params, raw={"sides": raw, "summaries": summaries})


def run(ctx) -> Result:
    """The suite's entry point."""
    reason = unavailable()
    if reason:
        return Result("deploy", skipped=reason)
    workdir = Path(tempfile.mkdtemp(prefix="prayer-room-bench-deploy-"))
    repeats = 1 if ctx.quick else 3
    try:
        if getattr(ctx, "against", None):
            return measure_against(workdir, repeats, ctx.against)
        return measure(workdir, repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    from types import SimpleNamespace

    argv = sys.argv[1:]
    against = argv[argv.index("--against") + 1] if "--against" in argv[:-1] else None
    result = run(SimpleNamespace(quick="--quick" in argv, against=against))
    print(table([result]))
    print(f"wrote {write(result)}")
    sys.exit(1 if result.error else 0)
