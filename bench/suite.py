"""The suite: run the chosen benchmarks against one seeded stack, print the table, write bench/results/."""

from __future__ import annotations

import importlib
import sys
import traceback

from bench import report
from bench.context import Context
from bench.load import wrk_missing
from tests.support.stack import services_unavailable

# name -> module with `run(ctx) -> Result`, in the order a full run takes them.
BENCHMARKS = {
    "web": "bench.web",
    "worker": "bench.worker",
    "beat": "bench.beat",
    "digests": "bench.digests",
    "memory": "bench.memory",
    "deploy": "bench.deploy_run",
    "archive": "bench.archive",
}
# Run only when named (`--only archive`): it boots a container and fills a 1 GB database (about 20 minutes).
OPT_IN = {"archive"}


def main(names: list[str] | None = None, quick: bool = False) -> int:
    """Run the named benchmarks (all when none) and return 1 if any could not run."""
    names = list(names or [name for name in BENCHMARKS if name not in OPT_IN])
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    missing = services_unavailable() or (wrk_missing() if {"web", "memory"} & set(names) else None)
    if missing:
        print(f"cannot benchmark: {missing}", file=sys.stderr)
        return 2
    ctx = Context(quick=quick).open()
    print(f"machine: {report.machine()}\nlogs in {ctx.log_dir}", flush=True)
    results = []
    try:
        for name in names:
            print(f"running {name} ...", flush=True)
            try:
                result = importlib.import_module(BENCHMARKS[name]).run(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not lose the others' results
                traceback.print_exc()
                result = report.Result(name, error=f"{type(exc).__name__}: {exc}")
            print(f"  wrote {report.write(result)}", flush=True)
            results.append(result)
    finally:
        ctx.close()
    print(report.table(results))
    (report.RESULTS_DIR / "last-run.md").write_text(report.markdown(results) + "\n")
    return 1 if any(result.error for result in results) else 0
