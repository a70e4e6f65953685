"""Item 1: `prodserver web` against plain `gunicorn prayer_room_api.wsgi`, same ARGS and worker count.

Both servers run side by side on their own ports; short wrk loads alternate between them (ABBA), so
the noise of a shared machine hits both alike, and each ratio is the median over back-to-back pairs.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

from bench.context import Context
from bench.load import wrk
from bench.procs import cpu_seconds
from bench.report import Result, Row, paired
from bench.services import BIN, Command, cli_args, prodserver
from bench.stats import interleaved
from tests.support.stack import free_port, http_status

LIST_PATH = os.environ.get("BENCH_LIST_PATH", "/api/requests/")
HEALTH_PATH = "/health/"
SIDES = ("prodserver", "gunicorn")
METRICS = {"rps": "req/s", "cpu_ms_per_request": "server CPU per request", "p50_ms": "p50", "p99_ms": "p99"}


def start(side: str, ctx: Context, port: int, log_dir) -> Command:
    """One web server on `port`: ours through prodserver, or gunicorn given the very same ARGS."""
    from django.conf import settings

    env = {**ctx.env, "PORT": str(port)}
    if side == "prodserver":
        return prodserver("web", env, log_dir)
    args = {**settings.PRODUCTION_PROCESSES["web"]["ARGS"], "bind": f"127.0.0.1:{port}"}
    return Command("gunicorn", [str(BIN / "gunicorn"), "prayer_room_api.wsgi", *cli_args(args)], env, log_dir)


def wait_for_200(server: Command, url: str, timeout: float = 60) -> float:
    """Seconds from the process start until `url` first answers 200, polled every 10 ms."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if http_status(url, timeout=1) == 200:
            return time.monotonic() - started
        if server.popen.poll() is not None:
            raise RuntimeError(f"{server.name} exited before serving:\n{server.output()[-3000:]}")
        time.sleep(0.01)
    raise RuntimeError(f"{server.name}: no 200 from {url} within {timeout} s")


def check_list_endpoint(base: str) -> None:
    with urllib.request.urlopen(base + LIST_PATH, timeout=5) as response:
        body = json.load(response)
    if len(body.get("results", [])) != 20:
        raise RuntimeError(f"{LIST_PATH} did not answer a page of 20: {str(body)[:300]}")


def startup_times(ctx: Context, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds to the first 200 from /health/, each side started alone, alternately."""
    times: dict[str, dict[str, list[float]]] = {side: {"wall": [], "cpu": []} for side in SIDES}
    for repeat, side in interleaved(SIDES, repeats):
        port = free_port()
        server = start(side, ctx, port, ctx.logs("web", f"start-{repeat}-{side}"))
        try:
            times[side]["wall"].append(wait_for_200(server, f"http://127.0.0.1:{port}{HEALTH_PATH}"))
            times[side]["cpu"].append(cpu_seconds(server.popen.pid))
        finally:
            server.stop()
    return times


def measured_load(server: Command, url: str, seconds: float) -> dict:
    """One wrk load, with the CPU time the server's processes spent on it per request."""
    cpu = cpu_seconds(server.popen.pid)
    load = wrk(url, seconds)
    cpu = cpu_seconds(server.popen.pid) - cpu
    return {"rps": load.rps, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "failed": load.failed} | {
        "cpu_ms_per_request": cpu * 1000 / max(load.requests, 1)
    }


def loads(ctx: Context, rounds: int, seconds: float) -> dict[str, dict[str, list[dict]]]:
    """wrk loads per endpoint and side, both servers up, the sides alternating round by round."""
    bases, servers = {}, {}
    try:
        for side in SIDES:
            port = free_port()
            bases[side] = f"http://127.0.0.1:{port}"
            servers[side] = start(side, ctx, port, ctx.logs("web", f"load-{side}"))
        out: dict[str, dict[str, list[dict]]] = {}
        for side in SIDES:
            wait_for_200(servers[side], bases[side] + HEALTH_PATH)
            check_list_endpoint(bases[side])
        for label, path in (("list", LIST_PATH), ("health", HEALTH_PATH)):
            for side in SIDES:
                wrk(bases[side] + path, 2)  # warm-up: connections, caches, lazy imports
            out[label] = {side: [] for side in SIDES}
            for _, side in interleaved(SIDES, rounds):
                out[label][side].append(measured_load(servers[side], bases[side] + path, seconds))
        return out
    finally:
        for server in servers.values():
            server.stop()


def run(ctx: Context) -> Result:
    rounds, seconds, starts = (2, 2, 2) if ctx.quick else (10, 3, 12)
    startup = startup_times(ctx, starts)
    measured = loads(ctx, rounds, seconds)
    rows = []
    for label, path in (("list", f"{LIST_PATH} page of 20"), ("health", HEALTH_PATH)):
        ours, theirs = measured[label]["prodserver"], measured[label]["gunicorn"]
        for metric, unit in (("rps", "req/s"), ("cpu_ms_per_request", "ms"), ("p50_ms", "ms"), ("p99_ms", "ms")):
            values = [[sample[metric] for sample in side] for side in (ours, theirs)]
            row = paired(f"{path} {METRICS[metric]}", unit, *values)
            if metric == "rps":
                row.target, row.met = "ratio >= 0.97", row.ratio >= 0.97
            if metric == "cpu_ms_per_request":
                row.target, row.met = "ratio <= 1.03", row.ratio <= 1 / 0.97
            rows.append(row)
    failed = sum(sample["failed"] for by_side in measured.values() for side in by_side.values() for sample in side)
    up = paired("start to first 200", "s", startup["prodserver"]["wall"], startup["gunicorn"]["wall"])
    up.target, up.met = "ratio <= 1.10", up.ratio <= 1.10
    up_cpu = paired("CPU to first 200", "s", startup["prodserver"]["cpu"], startup["gunicorn"]["cpu"])
    rows += [up, up_cpu, Row("failed requests (both sides)", failed, "", target="0", met=failed == 0)]
    params = {"rounds": rounds, "seconds_per_load": seconds, "starts_per_side": starts, "connections": 4}
    raw = {"startup_s": startup, "loads": measured}
    return Result("web", rows, params | {"list_path": LIST_PATH, "wrk_threads": 1}, raw)
