"""Item 1: `prodserver web` against plain `gunicorn prayer_room_api.wsgi`, same ARGS and worker count."""

from __future__ import annotations

import os
import time

from bench.context import Context
from bench.load import wrk
from bench.report import Result, Row
from bench.services import BIN, Command, cli_args, prodserver
from bench.stats import interleaved, median
from tests.support.stack import free_port, http_status

LIST_PATH = os.environ.get("BENCH_LIST_PATH", "/api/requests/")
HEALTH_PATH = "/health/"
SIDES = ("prodserver", "gunicorn")


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
    import json
    import urllib.request

    with urllib.request.urlopen(base + LIST_PATH, timeout=5) as response:
        body = json.load(response)
    if len(body.get("results", [])) != 20:
        raise RuntimeError(f"{LIST_PATH} did not answer a page of 20: {str(body)[:300]}")


def run(ctx: Context) -> Result:
    repeats, seconds = (2, 3) if ctx.quick else (5, 10)
    samples: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat, side in interleaved(SIDES, repeats):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start(side, ctx, port, ctx.logs("web", f"{repeat}-{side}"))
        try:
            sample = {"startup_s": wait_for_200(server, base + HEALTH_PATH)}
            check_list_endpoint(base)
            for label, path in (("list", LIST_PATH), ("health", HEALTH_PATH)):
                wrk(base + path, 2)  # warm-up: connections, caches, lazy imports
                load = wrk(base + path, seconds)
                sample |= {f"{label}_rps": load.rps, f"{label}_p50_ms": load.p50_ms}
                sample |= {f"{label}_p99_ms": load.p99_ms, f"{label}_failed": load.failed}
        finally:
            server.stop()
        samples[side].append(sample)

    def med(side: str, key: str) -> float:
        return median([sample[key] for sample in samples[side]])

    rows = []
    for label, path in (("list", f"{LIST_PATH} page of 20"), ("health", HEALTH_PATH)):
        rps = Row(f"{path} req/s", med("prodserver", f"{label}_rps"), "req/s", med("gunicorn", f"{label}_rps"))
        rps.target, rps.met = "ratio >= 0.97", rps.ratio >= 0.97
        rows += [
            rps,
            Row(f"{path} p50", med("prodserver", f"{label}_p50_ms"), "ms", med("gunicorn", f"{label}_p50_ms")),
            Row(f"{path} p99", med("prodserver", f"{label}_p99_ms"), "ms", med("gunicorn", f"{label}_p99_ms")),
        ]
    failed = sum(s[f"{label}_failed"] for side in SIDES for s in samples[side] for label in ("list", "health"))
    startup = Row("start to first 200", med("prodserver", "startup_s"), "s", med("gunicorn", "startup_s"))
    startup.target, startup.met = "ratio <= 1.10", startup.ratio <= 1.10
    rows += [startup, Row("failed requests (both sides)", failed, "", target="0", met=failed == 0)]
    params = {"repeats": repeats, "seconds": seconds, "connections": 4, "wrk_threads": 1, "list_path": LIST_PATH}
    return Result("web", rows, params, {"samples": samples})
