"""The app helper: runs ON a server as `<release>/.venv/bin/python -c <script> COMMAND`, the release's Django inside.

Run as the app user (or the build user for prepare), in the release's directory; the kit sends this script (with
deploy/on_server/common.py and deploy/app.py inlined) on each call, so the operator's kit decides what runs on the
server whatever release is live. Each command loads the shared env file first and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

from deploy.app import PING_TASK, REDIS_KEY_PREFIX, beat_leaders, write_smoke_test
from deploy.on_server.common import dispatch, emit


def _setup_django(started: float) -> bool:
    try:
        import django

        django.setup()
    except Exception as exc:  # noqa: BLE001 - an import or settings error of the new release
        emit(step="import", ok=False, error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
        return False
    emit(step="import", ok=True, seconds=round(time.monotonic() - started, 2))
    return True


def applied_migrations() -> set[tuple[str, str]]:
    from django.db import connection
    from django.db.migrations.recorder import MigrationRecorder

    return set(MigrationRecorder(connection).applied_migrations())


def prepare(args) -> int:
    """The release's steps, each timed, stopping at the first failure.

    Stage `before` (check --deploy, collectstatic) touches no schema, and lists every warning check --deploy
    found; stage `migrate` (migrate, then seed_schedules) reports which migrations it applied, even when it
    fails halfway.
    """
    if not _setup_django(time.monotonic()):
        return 1
    from django.core.management import call_command

    def check_deploy() -> dict:
        """`check --deploy`: fails on an error; every warning it finds is handed back to be printed."""
        from django.core import checks
        from django.core.management.base import SystemCheckError

        messages = [m for m in checks.run_checks(include_deployment_checks=True) if not m.is_silenced()]
        errors = [m for m in messages if m.is_serious()]
        if errors:
            raise SystemCheckError("; ".join(str(m) for m in errors))
        return {"warnings": [str(m) for m in messages]}

    stages = {
        "before": [
            ("check --deploy", check_deploy),
            ("mail server", lambda: mail_server_warning(args.env_file or "the env file")),
            ("collectstatic", lambda: call_command("collectstatic", interactive=False, verbosity=0)),
        ],
        "migrate": [
            ("migrate", lambda: call_command("migrate", interactive=False, verbosity=1)),
            ("seed_schedules", lambda: call_command("seed_schedules")),
        ],
    }
    chosen = args.stage or list(stages)
    steps = [step for stage in chosen for step in stages[stage]]
    before = applied_migrations() if "migrate" in chosen else set()
    for name, run in steps:
        started = time.monotonic()
        try:
            outcome = run()
        except BaseException as exc:  # noqa: BLE001 - SystemCheckError, CommandError, DB errors alike
            sys.stdout.flush()
            extra = {}
            if "migrate" in chosen:
                extra["applied"] = sorted(".".join(key) for key in applied_migrations() - before)
            error = f"{type(exc).__name__}: {exc}"[-2000:]
            emit(step=name, ok=False, error=error, seconds=time.monotonic() - started, **extra)
            return 1
        sys.stdout.flush()
        extra = {"applied": sorted(".".join(k) for k in applied_migrations() - before)} if name == "migrate" else {}
        if isinstance(outcome, str):
            extra["warning"] = outcome
        elif isinstance(outcome, dict):
            extra.update(outcome)  # check --deploy's warnings
        emit(step=name, ok=True, seconds=round(time.monotonic() - started, 2), **extra)
    return 0


def mail_server_warning(env_file: str) -> str | None:
    """None when EMAIL_URL's SMTP server accepts a connection (and the login, if any); else what to set.

    Opens and closes a connection as the digests do; no mail is sent.
    """
    from django.conf import settings
    from django.core.mail import get_connection

    if not settings.EMAIL_BACKEND.endswith("smtp.EmailBackend"):
        return None
    try:
        connection = get_connection(timeout=5)
        connection.open()
        connection.close()
    except Exception as exc:  # noqa: BLE001 - refused, unreachable, TLS or login failure: all mean no mail
        return (
            f"no mail will go out: the SMTP server {settings.EMAIL_HOST}:{settings.EMAIL_PORT} of EMAIL_URL did not "
            f"accept a connection ({type(exc).__name__}: {exc}); set it with `fab env --set "
            f"EMAIL_URL=smtp+tls://user:password@smtp.example.org:587` (it writes {env_file} and restarts the programs)"
        )
    return None


# --- the schema: what is applied, what a release knows, what a new migration does to the running release ----

INCOMPATIBLE = {
    "RemoveField": (
        "drops a column the running release still reads",
        "split it into two deploys: first ship code that no longer uses the field (remove it from the model "
        "with SeparateDatabaseAndState, or keep it with null=True), then drop the column in a later deploy",
    ),
    "RenameField": (
        "renames a column the running release reads under its old name",
        "add the new field beside the old one, copy the data, switch the code, and drop the old one in a later deploy",
    ),
    "RenameModel": (
        "renames a table the running release reads under its old name",
        "keep the table name (Meta.db_table = the old name) or split the rename over several deploys",
    ),
    "DeleteModel": (
        "drops a table the running release still uses",
        "first ship code that no longer uses the model (SeparateDatabaseAndState), then delete it in a later deploy",
    ),
    "AlterModelTable": (
        "moves a table the running release reads under its old name",
        "keep the old db_table, or split the move over several deploys",
    ),
}


def unsafe_operation(app_label: str, operation, state) -> tuple[str, str] | None:
    """Why `operation` of `app_label` (on project `state`) breaks the running release, and the fix; or None.

    The running release knows neither the new columns nor the new constraints: it inserts rows without
    them and reads the columns and tables it had.
    """
    from django.db.models import NOT_PROVIDED

    kind = type(operation).__name__
    if kind in INCOMPATIBLE:
        return INCOMPATIBLE[kind]
    if kind == "AddField":
        field = operation.field
        if field.many_to_many or field.null or getattr(field, "db_default", NOT_PROVIDED) is not NOT_PROVIDED:
            return None
        default = field.default if field.default is not NOT_PROVIDED else None
        hint = f"db_default={default!r}" if default is not None and not callable(default) else "db_default=..."
        return (
            f"adds the NOT NULL column {operation.model_name}.{operation.name} without a database default: "
            "the running release inserts rows without it and fails",
            f"use {hint} (the database fills it in), or null=True, or split into two deploys",
        )
    if kind == "AlterField":
        old = state.models.get((app_label, operation.model_name_lower))
        old_field = old.fields.get(operation.name) if old is not None else None
        new = operation.field
        if old_field is not None and old_field.null and not new.null:
            if getattr(new, "db_default", NOT_PROVIDED) is not NOT_PROVIDED:
                return None
            return (
                f"makes {operation.model_name}.{operation.name} NOT NULL: the running release may still write NULL",
                "give it a db_default, or keep null=True until every release writes a value, then alter it",
            )
    return None


def check_migrations(plan, loader) -> list[dict]:
    """Each operation of the migrations in `plan` (forwards, in order) the running release cannot live with."""
    found = []
    if not plan:
        return found
    # The schema before the plan: every ancestor of its migrations, none of them.
    state = loader.project_state([(m.app_label, m.name) for m, _ in plan], at_end=False)
    for migration, _backwards in plan:
        for operation in migration.operations:
            problem = unsafe_operation(migration.app_label, operation, state)
            if problem:
                found.append(
                    {
                        "migration": f"{migration.app_label}.{migration.name}",
                        "operation": operation.describe(),
                        "problem": problem[0],
                        "fix": problem[1],
                    }
                )
            operation.state_forwards(migration.app_label, state)
    return found


def migrations(args) -> int:
    """What the database has applied against what this release has on disk, and the new migrations' risks."""
    if not _setup_django(time.monotonic()):
        return 1
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    loader = executor.loader
    applied = set(loader.applied_migrations)
    known = set(loader.disk_migrations) | {r for m in loader.disk_migrations.values() for r in (m.replaces or [])}
    plan = executor.migration_plan(loader.graph.leaf_nodes())
    emit(
        ok=True,
        applied=sorted(".".join(k) for k in applied),
        unknown=sorted(".".join(k) for k in applied - known),
        new=sorted(f"{m.app_label}.{m.name}" for m, _ in plan),
        unsafe=check_migrations(plan, loader),
        operations={f"{m.app_label}.{m.name}": operation_kinds(m) for m, _ in plan},
    )
    return 0


def operation_kinds(migration) -> list[str]:
    """What a migration does to the database, one kind per operation (AddField, RunSQL, ...): the operations of a
    SeparateDatabaseAndState are its database ones; a migration that cannot run in a transaction says so."""

    def kinds(operations) -> list[str]:
        found = []
        for operation in operations:
            if type(operation).__name__ == "SeparateDatabaseAndState":
                found += kinds(operation.database_operations)
            else:
                found.append(type(operation).__name__)
        return found

    return kinds(migration.operations) + ([] if migration.atomic else ["non-atomic migration"])


def migrate_forward(args) -> int:
    """`migrate`, then `seed_schedules`, in ONE transaction: the database gets all of this release's migrations or
    none (restored data brought forward to the release that serves it)."""
    started = time.monotonic()
    if not _setup_django(started):
        return 1
    from django.core.management import call_command
    from django.db import transaction

    before = applied_migrations()
    try:
        with transaction.atomic():
            call_command("migrate", interactive=False, verbosity=0)
            call_command("seed_schedules")
    except Exception as exc:  # noqa: BLE001 - a migration's own error is the report; everything was rolled back
        sys.stdout.flush()
        emit(ok=False, error=f"{type(exc).__name__}: {exc}"[-1500:], applied=[])
        return 1
    sys.stdout.flush()
    emit(ok=True, applied=sorted(".".join(k) for k in applied_migrations() - before),
         seconds=round(time.monotonic() - started, 2))  # fmt: skip
    return 0


def unapply(args) -> int:
    """Unapply the named migrations (app.name) and whatever applied depends on them, newest first.

    With --check, only say whether every operation on the way can be reversed.
    """
    if not _setup_django(time.monotonic()):
        return 1
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    loader = executor.loader
    graph = loader.graph
    applied = set(loader.applied_migrations)
    wanted = {tuple(name.split(".", 1)) for name in args.names}
    missing = sorted(".".join(k) for k in wanted - set(graph.nodes))
    if missing:
        emit(ok=False, error=f"this release does not have {', '.join(missing)}, so it cannot unapply them")
        return 1
    doomed = {key for name in wanted for key in graph.backwards_plan(name) if key in applied}
    order = executor.migration_plan(graph.leaf_nodes(), clean_start=True)
    plan = [
        (loader.graph.nodes[(m.app_label, m.name)], True) for m, _ in reversed(order) if (m.app_label, m.name) in doomed
    ]
    irreversible = [
        f"{m.app_label}.{m.name}: {op.describe()}" for m, _ in plan for op in m.operations if not op.reversible
    ]
    if irreversible:
        emit(ok=False, error=f"cannot be reversed: {'; '.join(irreversible)}", irreversible=irreversible)
        return 1
    names = [f"{m.app_label}.{m.name}" for m, _ in plan]
    if args.check:
        emit(ok=True, unapply=names)
        return 0
    started = time.monotonic()
    executor.migrate([], plan=plan)
    emit(ok=True, unapplied=names, seconds=round(time.monotonic() - started, 2))
    return 0


def verify_writes(args) -> int:
    """`migrate --check`, then deploy/app.py's write smoke test (the public write path), rolled back."""
    if not _setup_django(time.monotonic()):
        return 1
    from django.core.management import call_command
    from django.db import transaction

    try:
        call_command("migrate", check=True, interactive=False, verbosity=0)
    except SystemExit:
        from django.db import connection
        from django.db.migrations.executor import MigrationExecutor

        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        pending = ", ".join(f"{m.app_label}.{m.name}" for m, _ in plan)
        emit(ok=False, error=f"migrate --check: unapplied migrations: {pending}")
        return 1
    started = time.monotonic()
    try:
        with transaction.atomic():
            write_smoke_test()
            transaction.set_rollback(True)
    except Exception as exc:  # noqa: BLE001 - the write path's own error is the report
        emit(ok=False, error=f"the write path fails: {type(exc).__name__}: {exc}"[:1500])
        return 1
    emit(ok=True, seconds=round(time.monotonic() - started, 2))
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
    # Under the prefix the settings give every Redis key and channel: the app's Redis ACL user may touch no other.
    app.conf.broker_transport_options = app.conf.result_backend_transport_options = {
        "global_keyprefix": REDIS_KEY_PREFIX
    }
    app.conf.broker_connection_retry_on_startup = True

    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while time.monotonic() < deadline:
        # --queue: one host's own queue (a cluster's worker hosts each consume host.<address>); a ping nobody takes
        # expires instead of waiting in Redis for a worker of a later deploy.
        options = {"queue": args.queue} if args.queue else {}
        result = app.send_task(PING_TASK, expires=args.timeout, **options)
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


def schedule_text(task) -> str:
    """A periodic task's schedule on one line, e.g. "0 8 * * 1 (m/h/dM/MY/d) UTC" or "every 60 seconds".

    NOTE: str() of Celery's own crontab (`task.schedule`) spans several indented lines.
    """
    source = task.crontab or task.interval or task.solar or task.clocked or task.schedule
    return " ".join(str(source).split())


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
            "schedule": schedule_text(t),
            "last_run": t.last_run_at.strftime("%Y-%m-%d %H:%M:%S %Z") if t.last_run_at else "never",
        }
        for t in PeriodicTask.objects.select_related("crontab", "interval", "solar", "clocked").order_by("name")
    ]
    emit(ok=True, schedules=rows)
    return 0


def beat_leader(args) -> int:
    """Exactly one beat holds the leader lock (deploy/app.py's beat_leaders); waits out a takeover in progress."""
    import django

    django.setup()
    from django.db import connection

    deadline = time.monotonic() + args.timeout
    while True:
        with connection.cursor() as cursor:
            rows = beat_leaders(cursor)
        if len(rows) == 1:
            emit(ok=True, leader=rows[0][0], address=rows[0][1])
            return 0
        if time.monotonic() > deadline:
            emit(ok=False, error=f"{len(rows)} beats hold the leader lock after {args.timeout:.0f} s, not one")
            return 1
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="app_helper")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare_parser = sub.add_parser("prepare")
    prepare_parser.add_argument("--stage", action="append", choices=("before", "migrate"), default=[])
    sub.add_parser("migrations")
    sub.add_parser("migrate-forward")
    sub.add_parser("verify-writes")
    unapply_parser = sub.add_parser("unapply")
    unapply_parser.add_argument("--check", action="store_true")
    unapply_parser.add_argument("names", nargs="+")
    sub.add_parser("schedules")
    sub.add_parser("beat-leader").add_argument("--timeout", type=float, default=20)
    health_parser = sub.add_parser("health")
    health_parser.add_argument("--port", type=int, required=True)
    ping_parser = sub.add_parser("ping")
    ping_parser.add_argument("--queue", default="", help="send it to this queue (default: the shared one)")
    for p in (health_parser, ping_parser):
        p.add_argument("--expect", required=True)
        p.add_argument("--timeout", type=float, default=60)
    commands = {
        "prepare": prepare,
        "migrations": migrations,
        "migrate-forward": migrate_forward,
        "unapply": unapply,
        "verify-writes": verify_writes,
        "health": health,
        "ping": ping,
        "schedules": schedules,
        "beat-leader": beat_leader,
    }
    return dispatch(parser, commands, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
