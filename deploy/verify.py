"""After a restart: the web answers for the new release, a worker of it runs a task, beat uses the database."""

from __future__ import annotations

import time

from deploy.errors import DeployError
from deploy.processes import log_path
from deploy.remote import Server, sh

BEAT_SCHEDULER = "django_celery_beat.schedulers.DatabaseScheduler"


def check_web(server: Server, release_dir, release_id: str, port: int) -> None:
    """/health/ on the web program's port answers 200 naming `release_id`."""
    timeout = server.config.health_timeout
    server.helper(
        release_dir, "health", "--port", str(port), "--expect", release_id, "--timeout", str(timeout),
        what=f"health check on port {port}", timeout=timeout + 30,
    )  # fmt: skip


def check_worker(server: Server, release_dir, release_id: str) -> str:
    """A ping task sent through the broker is run by a worker of `release_id`; returns the worker's host name."""
    timeout = server.config.health_timeout
    lines = server.helper(
        release_dir, "ping", "--expect", release_id, "--timeout", str(timeout),
        what="ping task through the worker", timeout=timeout + 30,
    )  # fmt: skip
    return lines[-1].get("hostname", "?")


def check_beat(server: Server, beat_name: str, log_offset: int, timeout: float = 30) -> None:
    """The beat started since `log_offset` in its log announced the DatabaseScheduler."""
    path = log_path(server, beat_name)
    # A log rotated since the restart is read from its start.
    probe = (
        f'f={sh(path)}; o={log_offset + 1}; [ $(stat -c %s "$f") -lt {log_offset} ] && o=1; '
        f'tail -c +$o "$f" | grep -c {sh(BEAT_SCHEDULER)}'
    )
    deadline = time.monotonic() + timeout
    while True:
        result = server.root(probe, what="reading beat's log", warn=True)
        if result.stdout.strip() not in ("", "0"):
            return
        if time.monotonic() > deadline:
            tail = server.root(sh("tail", "-n", "15", path), what="reading beat's log", warn=True).stdout
            raise DeployError(
                f"beat did not start with {BEAT_SCHEDULER} within {timeout:.0f} s; its log: {tail[-800:]}"
            )
        time.sleep(0.5)
