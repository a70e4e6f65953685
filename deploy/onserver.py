"""The deploy's hands on the server: run as `<release>/.venv/bin/python -c <this file> COMMAND` inside a release.

Self-contained (standard library, plus Django and Celery from the release's virtualenv), so the
operator's kit decides what runs on the server whatever release is live. Each command loads the
shared env file first and prints one JSON line for the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def read_env_file(text: str) -> dict[str, str]:
    """KEY=value lines (the layout's env file format): blanks and # lines skipped, one pair of quotes stripped."""
    values = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"env file line {number} is not KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_environment(env_file: str, defaults: list[str], overrides: list[str]) -> None:
    """Put --default values, the env file's, then --set overrides into os.environ; make the project importable."""
    values = dict(item.partition("=")[::2] for item in defaults)
    with open(env_file) as handle:
        values.update(read_env_file(handle.read()))
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = value
    os.environ.update(values)
    project = os.path.join(os.getcwd(), "project")
    if project not in sys.path:
        sys.path.insert(0, project)


def emit(**fields) -> None:
    """One JSON line for the caller, on a line of its own even after a command's unfinished line."""
    sys.stdout.flush()
    print("\n" + json.dumps(fields), flush=True)


def prepare(args) -> int:
    """check --deploy, migrate, seed_schedules, collectstatic, each timed; stop at the first failure."""
    started = time.monotonic()
    try:
        import django

        django.setup()
    except Exception as exc:  # noqa: BLE001 - an import or settings error of the new release
        emit(step="import", ok=False, error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
        return 1
    emit(step="import", ok=True, seconds=round(time.monotonic() - started, 2))
    from django.core.management import call_command

    steps = [
        ("check --deploy", lambda: call_command("check", deploy=True, fail_level="ERROR")),
        ("migrate", lambda: call_command("migrate", interactive=False, verbosity=1)),
        ("seed_schedules", lambda: call_command("seed_schedules")),
        ("collectstatic", lambda: call_command("collectstatic", interactive=False, verbosity=0)),
    ]
    for name, run in steps:
        started = time.monotonic()
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - SystemCheckError, CommandError, DB errors alike
            emit(step=name, ok=False, error=f"{type(exc).__name__}: {exc}"[-2000:], seconds=time.monotonic() - started)
            return 1
        sys.stdout.flush()
        emit(step=name, ok=True, seconds=round(time.monotonic() - started, 2))
    return 0


def health(args) -> int:
    """Poll one web port's /health/ until it answers 200 naming the expected release."""
    from django.conf import settings

    hosts = [h.lstrip(".") for h in settings.ALLOWED_HOSTS if h != "*" and "*" not in h]
    host = hosts[0] if hosts else "localhost"
    request = urllib.request.Request(
        f"http://127.0.0.1:{args.port}/health/", headers={"Host": host, "X-Forwarded-Proto": "https"}
    )
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                body = json.loads(response.read() or b"{}")
                if body.get("release") == args.expect:
                    emit(ok=True, port=args.port, release=body.get("release"))
                    return 0
                last = f"HTTP {response.status}, release {body.get('release')!r}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
        except (OSError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            emit(ok=False, port=args.port, error=f"no healthy answer naming {args.expect} in {args.timeout} s: {last}")
            return 1
        time.sleep(0.25)


def ping(args) -> int:
    """Send the ping task through the broker and wait for a worker of the expected release to answer."""
    from celery import Celery

    # Django is not needed to send a task by name: a bare app on the project's broker starts in a fraction.
    broker = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
    app = Celery(broker=broker, backend=os.environ.get("CELERY_RESULT_BACKEND", broker))
    app.conf.broker_connection_retry_on_startup = True

    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while time.monotonic() < deadline:
        result = app.send_task("prayer_room_api.tasks.ping")
        try:
            answer = result.get(timeout=max(1.0, min(15.0, deadline - time.monotonic())), propagate=False)
        except Exception as exc:  # noqa: BLE001 - timeout or broker error: report the last one
            last = f"{type(exc).__name__}: {exc}"
            continue
        if result.failed():
            emit(ok=False, error=f"the ping task failed in the worker: {result.result!r}")
            return 1
        if answer.get("release") == args.expect:
            emit(ok=True, **answer)
            return 0
        last = f"answered by release {answer.get('release')!r}"
    emit(ok=False, error=f"no worker of release {args.expect} ran the ping task in {args.timeout} s: {last}")
    return 1


def schedules(args) -> int:
    """The periodic tasks beat runs from the database."""
    import django

    django.setup()
    from django_celery_beat.models import PeriodicTask

    rows = [
        {
            "name": t.name,
            "task": t.task,
            "enabled": t.enabled,
            "schedule": str(t.schedule),
            "last_run": str(t.last_run_at),
        }
        for t in PeriodicTask.objects.order_by("name")
    ]
    emit(ok=True, schedules=rows)
    return 0


def beat_leader(args) -> int:
    """Exactly one beat holds the leader lock (prayer_room_api.beat); waits out a takeover in progress."""
    import django

    django.setup()
    from django.db import connection

    from prayer_room_api.beat import leaders

    deadline = time.monotonic() + args.timeout
    while True:
        with connection.cursor() as cursor:
            rows = leaders(cursor)
        if len(rows) == 1:
            emit(ok=True, leader=rows[0][0], address=rows[0][1])
            return 0
        if time.monotonic() > deadline:
            emit(ok=False, error=f"{len(rows)} beats hold the leader lock after {args.timeout:.0f} s, not one")
            return 1
        time.sleep(0.5)


def supervisor_rpc(socket_path: str):
    """An XML-RPC proxy to supervisord over its unix socket, with the standard library only."""
    import http.client
    import socket
    import xmlrpc.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(socket_path)

    class UnixTransport(xmlrpc.client.Transport):
        def make_connection(self, host):
            return UnixConnection("localhost")

    return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=UnixTransport())


def cycle(args) -> int:
    """Stop each program (waiting: TERM, then its graceful stop), then start it without waiting for startsecs.

    The caller's health check is the real readiness test, so `supervisorctl restart`'s wait is saved.
    """
    import xmlrpc.client

    rpc = supervisor_rpc(args.socket)
    for name in args.names:
        try:
            rpc.supervisor.stopProcess(name, True)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != 70:  # NOT_RUNNING is fine
                emit(ok=False, error=f"stopping {name}: {fault.faultString}")
                return 1
        try:
            rpc.supervisor.startProcess(name, False)
        except xmlrpc.client.Fault as fault:
            emit(ok=False, error=f"starting {name}: {fault.faultString}")
            return 1
    emit(ok=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="onserver")
    parser.add_argument("--env-file")
    parser.add_argument("--default", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare")
    cycle_parser = sub.add_parser("cycle")
    cycle_parser.add_argument("--socket", required=True)
    cycle_parser.add_argument("names", nargs="+")
    sub.add_parser("schedules")
    sub.add_parser("beat-leader").add_argument("--timeout", type=float, default=20)
    health_parser = sub.add_parser("health")
    health_parser.add_argument("--port", type=int, required=True)
    for p in (health_parser, sub.add_parser("ping")):
        p.add_argument("--expect", required=True)
        p.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    if args.env_file:
        load_environment(args.env_file, args.default, args.set)
    commands = {
        "prepare": prepare,
        "health": health,
        "ping": ping,
        "schedules": schedules,
        "cycle": cycle,
        "beat-leader": beat_leader,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
