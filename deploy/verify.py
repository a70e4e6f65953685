"""After a restart: the web answers for the new release, a worker of it runs a task, beat uses the database."""

from __future__ import annotations

import json
import time

import paramiko

from deploy.app import LEADER_SCHEDULER
from deploy.commands import logs
from deploy.commands.verify import ping
from deploy.errors import DeployError
from deploy.ssh import Server

BEAT_SCHEDULER = "django_celery_beat.schedulers.DatabaseScheduler"


def health_host(env_values: dict[str, str]) -> str:
    """A Host header Django accepts: the first plain name of ALLOWED_HOSTS."""
    names = [h.strip().lstrip(".") for h in env_values.get("ALLOWED_HOSTS", "").split(",")]
    names = [h for h in names if h and "*" not in h]
    return names[0] if names else "localhost"


def _get_over_ssh(server: Server, port: int, host: str) -> tuple[int | None, str]:
    """GET /health/ on the server's loopback port through an SSH direct-tcpip channel (no process started)."""
    transport = server.conn.transport
    try:
        channel = transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=10)
    except paramiko.ChannelException as exc:
        if exc.code == 1:  # administratively prohibited: sshd forbids TCP forwarding
            raise
        return None, f"port {port} refused the connection"
    try:
        channel.settimeout(15)
        channel.sendall(
            f"GET /health/ HTTP/1.0\r\nHost: {host}\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := channel.recv(65536):
            data += chunk
    except (OSError, paramiko.SSHException) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        channel.close()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, f"no HTTP answer on port {port}"
    return status, body.decode(errors="replace")


def check_web(server: Server, release_dir, release_id: str, port: int, host: str) -> None:
    """/health/ on the web program's port answers 200 naming `release_id`, within health_timeout."""
    timeout = server.config.health_timeout
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            status, body = _get_over_ssh(server, port, host)
        except paramiko.ChannelException:
            server.helper(
                release_dir, "health", "--port", str(port), "--expect", release_id, "--timeout", str(timeout),
                what=f"health check on port {port}", timeout=timeout + 30,
            )  # fmt: skip
            return
        if status == 200:
            try:
                release = json.loads(body).get("release")
            except ValueError:
                release = None
            if release == release_id:
                return
            last = f"HTTP 200 from release {release!r}"
        else:
            last = f"HTTP {status}: {body[:300]}" if status else body
        if time.monotonic() > deadline:
            raise DeployError(f"port {port}: no healthy answer naming {release_id} in {timeout} s ({last})")
        time.sleep(0.2)


def ping_command(server: Server, release_dir, release_id: str, programs_text: str = "") -> str:
    """deploy.commands.verify.ping for this server (its config, the app user's home)."""
    return ping(server.config, release_dir, release_id, server.app_home, programs_text)


def check_worker(server: Server, release_dir, release_id: str, programs_text: str = "") -> str:
    """Run the ping check now; returns the answering worker's host name."""
    result = server.root(ping_command(server, release_dir, release_id, programs_text), what="ping task", warn=True)
    return worker_answer(server, result)


def worker_answer(server: Server, result) -> str:
    lines = server.helper_lines(result, what="ping task through the worker")
    return lines[-1].get("hostname", "?")


LOCK_DECIDED = ("took the leader lock", "standby: the leader lock is held")


def check_beat(server: Server, log_offset: int, release_dir=None, timeout: float = 30) -> str:
    """The beat started since `log_offset` runs a database scheduler; with the leader lock, exactly one beat leads.

    Returns what the check saw: the leader's session name, or the scheduler of a release without the lock.
    """
    path = server.config.layout.logs / "beat.log"
    # A log rotated since the restart is read from its start.
    since = logs.since(path, log_offset)
    deadline = time.monotonic() + timeout
    while True:
        log = server.root(since, what="reading beat's log", warn=True).stdout
        started = BEAT_SCHEDULER in log or LEADER_SCHEDULER in log
        if started and (LEADER_SCHEDULER not in log or any(line in log for line in LOCK_DECIDED)):
            break
        if time.monotonic() > deadline:
            tail = server.root(logs.tail([path], 15), what="reading beat's log", warn=True).stdout
            what = "took or waited for the leader lock" if started else f"started with {BEAT_SCHEDULER}"
            raise DeployError(f"beat never {what} in {timeout:.0f} s; its log: {tail[-800:]}")
        time.sleep(0.5)
    if LEADER_SCHEDULER not in log or release_dir is None:
        return BEAT_SCHEDULER  # a release from before the leader lock
    lines = server.helper(release_dir, "beat-leader", "--timeout", "20", what="beat leader check", timeout=60)
    return lines[-1].get("leader", "?")
