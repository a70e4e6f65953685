"""Item 5: memory of the whole local stack under supervisord (web 2 workers, worker concurrency 2, beat).

The stack is the repo's own supervisord.conf.j2, rendered by deploy.render.supervisord for a checkout, with the
production settings. RSS counts pages shared between forked processes once per process; PSS shares
them out, so its sum is what the stack really occupies.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from bench.context import Context
from bench.load import wrk
from bench.procs import process_tree, started_at, usage
from bench.report import Result, Row
from bench.services import BIN, REPO, Command
from bench.stats import median
from bench.web import LIST_PATH, wait_for_200
from tests.support.stack import free_port

TARGET_MB = 400
ENV_PASSED = (
    "DJANGO_SETTINGS_MODULE",
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "EMAIL_URL",
    "SECURE_SSL_REDIRECT",
    "SECURE_COOKIES",
)


def snapshot(root: int) -> dict:
    processes = [u for u in map(usage, process_tree(root)) if u]
    return {
        "rss_mb": sum(p["rss_mb"] for p in processes),
        "pss_mb": sum(p["pss_mb"] for p in processes),
        "processes": processes,
    }


def start_stack(ctx: Context, port: int) -> tuple[Command, Path]:
    """supervisord in the foreground, from the repo's template rendered for a checkout."""
    from deploy.render.supervisord import local_context, render_supervisord_conf

    var = ctx.logs("memory", "var")
    for folder in ("run", "log"):
        (var / folder).mkdir(exist_ok=True)
    environment = {name: ctx.env[name] for name in ENV_PASSED}
    environment |= {"WEB_WORKERS": "2", "WORKER_CONCURRENCY": "2"}
    context = local_context(REPO, var, sys.executable, port=port, environment=environment)
    config = var / "supervisord.conf"
    config.write_text(render_supervisord_conf(context))
    stack = Command("supervisord", [str(BIN / "supervisord"), "-n", "-c", str(config)], ctx.env, var)
    return stack, var / "log"


def stop(stack: Command) -> None:
    """Stop supervisord, then whatever of its tree outlived it (each program has a process group of its own)."""
    tree = {pid: started_at(pid) for pid in process_tree(stack.popen.pid)}
    stack.stop(timeout=60)
    for pid, started in tree.items():
        if started is not None and started_at(pid) == started:  # still the very process we started
            os.kill(pid, signal.SIGKILL)


def sample_while(root: int, busy: threading.Thread, every: float = 0.5) -> list[dict]:
    samples = []
    while busy.is_alive():
        samples.append(snapshot(root))
        time.sleep(every)
    return samples


def run(ctx: Context) -> Result:
    seconds = 5 if ctx.quick else 15
    port = free_port()
    stack, logs = start_stack(ctx, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_200(stack, base + "/health/", timeout=90)
        for name, text in (("worker", " ready."), ("beat", "beat: Starting")):
            log = next(logs.glob(f"{name}*.log"))
            stack.wait_for(lambda log=log, text=text: text in log.read_text(errors="replace"), 60, f"{name} started")
        time.sleep(5)  # let start-up settle
        idle = []
        for _ in range(5):
            idle.append(snapshot(stack.popen.pid))
            time.sleep(1)
        load = threading.Thread(target=wrk, args=(base + LIST_PATH, seconds))
        load.start()
        loaded = sample_while(stack.popen.pid, load)
        load.join()
    finally:
        stop(stack)
    idle_rss, idle_pss = median([s["rss_mb"] for s in idle]), median([s["pss_mb"] for s in idle])
    peak_rss, peak_pss = max(s["rss_mb"] for s in loaded), max(s["pss_mb"] for s in loaded)
    target = f"<= {TARGET_MB} MB"
    rows = [
        Row("idle, RSS sum", idle_rss, "MB", target=target, met=idle_rss <= TARGET_MB),
        Row("idle, PSS sum", idle_pss, "MB", target=target, met=idle_pss <= TARGET_MB),
        Row("under web load, peak RSS sum", peak_rss, "MB", target=target, met=peak_rss <= TARGET_MB),
        Row("under web load, peak PSS sum", peak_pss, "MB", target=target, met=peak_pss <= TARGET_MB),
        Row("processes", len(idle[-1]["processes"])),
    ]
    params = {"web_workers": 2, "worker_concurrency": 2, "load": f"wrk {LIST_PATH} {seconds} s, 4 connections"}
    return Result("memory", rows, params, {"idle": idle[-1], "peak_under_load": max(loaded, key=lambda s: s["rss_mb"])})
