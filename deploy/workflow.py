"""The operator's commands, one function each (fabfile.py wraps them): deploy, rollback, plan, status, ..."""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from fabric import Connection

from deploy import backup, release, schema, tls, verify
from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.lock import DeployLock
from deploy.maintenance import window as maintenance_window
from deploy.processes import Programs, config_diff, log_path, rolling_restart, wait_running
from deploy.progress import Progress
from deploy.remote import Server, connect, sh
from deploy.render.supervisord import render_supervisord_conf, server_context
from deploy.schema import SchemaReport
from deploy.state import ServerState, read_state


def _render(server: Server, state: ServerState) -> str:
    """This server's programs config; a bad context or env value fails here, before anything is uploaded."""
    context = server_context(
        server.config, state.env_values(server), home=server.app_home, web_ports=server.config.web_ports
    )
    return render_supervisord_conf(context)


def _activate(server: Server, state: ServerState, release_id: str, programs_text: str, progress: Progress) -> None:
    """Make `release_id` live: switch `current`, load its programs, restart each as it needs, verify, mark it.

    On a cluster host only its roles' programs run and are checked.
    """
    layout = server.config.layout
    release_dir = layout.releases / release_id
    programs = Programs.from_config(server.config)
    workers = server.config.runs("worker")
    host = verify.health_host(state.env_values(server))
    ping = verify.ping_command(server, release_dir, release_id, programs_text) if workers else None
    switch = release.switch_command(server, release_id)
    if state.live_programs != programs_text:
        with progress.step(f"switch current -> {release_id}; install programs.conf; supervisorctl update"):
            progress.say("   the programs config changed: supervisord restarts the whole group at once")
            server.upload(
                [(programs_text, layout.programs_conf, "root", "0600")],
                then=f"{switch} && {server.supervisorctl_command('update')}",
                what="installing programs.conf",
            )
            wait_running(server, programs.all, timeout=server.config.health_timeout)
        for name, port in programs.web:
            with progress.step(f"health check of {name.split(':')[-1]} (port {port})"):
                verify.check_web(server, release_dir, release_id, port, host)
        if workers:
            with progress.step("verify: a worker of this release runs the ping task"):
                progress.say(f"   answered by {verify.check_worker(server, release_dir, release_id, programs_text)}")
    else:
        with progress.step(f"switch current -> {release_id}"):
            server.root(switch, what="switching current")
        result = rolling_restart(
            server,
            programs,
            lambda port: verify.check_web(server, release_dir, release_id, port, host),
            progress.step,
            after_workers=ping,
        )
        if workers:
            with progress.step("verify: a worker of this release ran the ping task"):
                progress.say(f"   answered by {verify.worker_answer(server, result)}")
    if server.config.runs("beat"):
        with progress.step("verify: beat runs the DatabaseScheduler; one beat leads"):
            progress.say(f"   leader: {verify.check_beat(server, state.beat_log_size, release_dir)}")
    wait_running(server, programs.all, timeout=10)
    with progress.step("verify: migrate --check; a request written through the API serializer, rolled back"):
        server.helper(release_dir, "verify-writes", what="verifying that writes work", timeout=120)


def _stop_all(server: Server, progress: Progress) -> None:
    """Stop web, worker and beat (the worker warm: running tasks finish), e.g. while the schema changes."""
    with progress.step("stop web, worker and beat"):
        server.supervisorctl("stop", *Programs.from_config(server.config).all, what="stopping the programs")


@contextmanager
def _locked(server: Server, action: str, progress: Progress) -> Iterator[DeployLock]:
    """Hold the deploy lock (refreshed between steps) for the block; on failure print the summary; always release."""
    lock = DeployLock(server, action)
    with progress.step("take the deploy lock"):
        lock.acquire()
    last = [time.monotonic()]

    def heartbeat() -> None:
        if time.monotonic() - last[0] > 30:
            lock.refresh()
            last[0] = time.monotonic()

    progress.heartbeat = heartbeat
    try:
        yield lock
    except BaseException as exc:
        progress.say(progress.summary(f"FAILED ({type(exc).__name__})"))
        raise
    finally:
        lock.release()


def deploy(
    conn: Connection, config: DeployConfig, repo: Path, *, allow_dirty: bool = False, maintenance: bool = False
) -> str:
    """Ship HEAD of `repo`, prepare it, make it live and verify it; roll back on any failure. Returns the id.

    New migrations the live release cannot run against are refused, unless `maintenance` (a 503 window).
    """
    source = checked_source(repo, allow_dirty)
    progress = Progress(f"deploy {source.short} to {conn.host}")
    if source.dirty:
        progress.say(f"WARNING: shipping HEAD {source.short}; {len(source.dirty)} uncommitted change(s) stay behind.")
    with progress.step("connect"):
        server = connect(conn, config)
    with _locked(server, f"deploy {source.short}", progress) as lock:
        with progress.step("read the server's state; render the supervisord programs"):
            state = read_state(server)
            state.require_provisioned(server)
            programs_text = _render(server, state)  # a bad context fails here, before anything is uploaded
        release_id = _deploy_locked(server, state, source, programs_text, progress, lock, maintenance=maintenance)
    progress.say(progress.summary(f"{release_id} is live"))
    return release_id


def checked_source(repo: Path, allow_dirty: bool) -> release.Source:
    """HEAD of `repo`, refused when the work tree has uncommitted changes unless `allow_dirty`."""
    source = release.local_source(repo)
    if source.dirty and not allow_dirty:
        listed = ", ".join(source.dirty[:5]) + (" ..." if len(source.dirty) > 5 else "")
        raise DeployError(
            f"the work tree has uncommitted changes ({listed}); commit them, or pass --allow-dirty to ship "
            f"HEAD {source.short} without them."
        )
    return source


def _report_steps(progress: Progress, seen: list[dict]):
    def report(lines: list[dict]) -> None:
        seen.extend(lines)
        for line in lines:
            if "step" in line:
                progress.say(f"   {'ok' if line.get('ok') else 'FAILED'}  {line['step']} ({line['seconds']:.1f} s)")
                for warning in line.get("warnings", []):
                    progress.say(f"   WARNING: {' '.join(warning.split())}")
            if line.get("warning"):
                progress.say(f"   WARNING: {line['warning']}")

    return report


def applied_migrations(lines: list[dict]) -> list[str]:
    """The migrations the prepare helper's `migrate` step reports it applied (none when it did not get there)."""
    return next((line.get("applied", []) for line in lines if "applied" in line), [])


def _undo_migrations(server: Server, release_dir, applied: list[str], saved: dict | None, progress: Progress) -> str:
    """Unapply the migrations a failed deploy applied (with its own code); a sentence on the database's state."""
    if not applied:
        return "no migration was applied"
    try:
        with progress.step(f"unapply the {len(applied)} migration(s) this deploy applied"):
            undone = schema.unapply(server, release_dir, applied)
        return f"the migrations it applied were unapplied ({', '.join(undone)}): the schema is as before"
    except DeployError as exc:
        back = (
            f"`fab restore {saved['name']} --yes` puts back the database of before the deploy (writes since are lost)"
            if saved
            else "no backup was taken"
        )
        return f"the database KEEPS the migrations {', '.join(applied)} ({exc}); {back}"


def _deploy_locked(
    server: Server,
    state: ServerState,
    source,
    programs_text: str,
    progress: Progress,
    lock: DeployLock,
    *,
    maintenance: bool = False,
) -> str:
    previous = state.current
    release_id = source.release_id()
    release_dir = server.config.layout.releases / release_id
    serving = f"{previous} keeps serving" if previous else "nothing was live"
    with progress.step(f"upload {release_id}"):
        release.upload_release(server, source, release_id, programs_text)
    saved = None
    try:
        if source.lock_hash in state.ready_venvs:
            progress.say(f"   virtualenv venvs/{source.lock_hash} reused (requirements.lock unchanged)")
        else:
            with progress.step(f"build virtualenv venvs/{source.lock_hash} from requirements.lock"):
                release.build_venv(server, release_id, source.lock_hash, wrap=lock.kept_alive)
        with progress.step("check the new migrations against the live release"):
            report = SchemaReport.read(server, release_dir, wrap=lock.kept_alive)
            progress.say(f"   new migrations: {', '.join(report.new) or 'none'}")
            for item in report.unsafe:
                progress.say(f"   UNSAFE {item['migration']}: {item['problem']}")
            if report.unsafe and previous and not maintenance:
                raise DeployError(schema.refuse_unsafe(report.unsafe, previous))
        with progress.step("prepare: check --deploy, collectstatic (as the build user)"):
            server.helper(
                release_dir, "prepare", "--stage", "before", what="prepare",
                on_lines=_report_steps(progress, []), wrap=lock.kept_alive, build=True,
            )  # fmt: skip
            release.seal_static(server, release_id)
        if report.new and previous:
            with progress.step(f"back up the database before migrating (named after {release_id})"):
                saved = backup.take(server, "deploy", release_id, wrap=lock.kept_alive)
                progress.say(f"   {saved['name']}: {backup.size(saved['size'])} in {saved['seconds']:.1f} s")
    except BaseException as exc:
        release.remove_release(server, release_id)
        if isinstance(exc, DeployError):
            raise DeployError(f"{exc} -- stopped before the switch and before any migration; {serving}.") from exc
        raise
    windowed = maintenance and bool(report.new) and previous is not None
    with maintenance_window(server, progress, "the schema changes") if windowed else nullcontext():
        if windowed:
            _stop_all(server, progress)
        seen: list[dict] = []
        try:
            with progress.step("prepare: migrate, seed_schedules"):
                server.helper(
                    release_dir, "prepare", "--stage", "migrate", what="prepare",
                    on_lines=_report_steps(progress, seen), wrap=lock.kept_alive,
                )  # fmt: skip
        except BaseException as exc:
            applied = applied_migrations(seen)
            where = _undo_migrations(server, release_dir, applied, saved, progress)
            if windowed:
                with progress.step(f"start {previous}'s programs again"):
                    server.supervisorctl("start", *Programs.from_config(server.config).all, what="starting")
            release.remove_release(server, release_id)
            if isinstance(exc, DeployError):
                raise DeployError(f"{exc} -- failed at the schema step; {where}; {serving}.") from exc
            raise
        applied = applied_migrations(seen)
        try:
            _activate(server, state, release_id, programs_text, progress)
        except BaseException as exc:
            reason = str(exc) or type(exc).__name__
            if previous is None:
                raise DeployError(f"{reason} -- and there is no earlier release to roll back to.") from exc
            progress.say(f"!! {reason}\n!! rolling back to {previous}")
            where = _undo_migrations(server, release_dir, applied, saved, progress)
            try:
                _rollback_to(server, previous, progress)
            except DeployError as again:
                raise DeployError(f"{reason} -- and the rollback to {previous} failed too: {again}; {where}") from exc
            release.remove_release(server, release_id)
            if isinstance(exc, DeployError):
                raise DeployError(
                    f"deploy of {release_id} failed and was rolled back to {previous}: {reason}; {where}"
                ) from exc
            raise
    with progress.step("mark the release verified; prune old releases and virtualenvs"):
        removed = release.finish(server, state, release_id, source.lock_hash)
        if removed:
            progress.say(f"   removed {', '.join(removed)}")
    return release_id


def _rollback_to(server: Server, target: str, progress: Progress) -> None:
    """Make an earlier release live again, with the programs config it was deployed with.

    The release rolled back from loses its verified mark, so the next rollback skips it.
    """
    state = read_state(server)
    stored = server.read(release.history_path(server, target), what="reading the release's programs config")
    _activate(server, state, target, stored or _render(server, state), progress)
    if state.current and state.current != target:
        release.unmark(server, state.current)
    release.finish(server, state, target, state.venvs.get(target, ""))


def rollback(
    conn: Connection,
    config: DeployConfig,
    *,
    to: str | None = None,
    unapply: bool = False,
    restore: str | None = None,
    keep_schema: bool = False,
) -> str:
    """Back to the previous verified release (code, virtualenv, programs config), refused when the database has
    migrations that release lacks, unless told what to do with them: `unapply`, `restore` a backup, `keep_schema`."""
    if sum((unapply, bool(restore), keep_schema)) > 1:
        raise DeployError("choose one of --unapply, --restore BACKUP and --keep-schema.")
    progress = Progress(f"rollback on {conn.host}")
    with progress.step("connect and check the server"):
        server = connect(conn, config)
        read_state(server).require_provisioned(server)
    layout = config.layout
    with _locked(server, f"rollback{' to ' + to if to else ''}", progress):
        # NOTE: the target is chosen under the lock: a deploy that finished meanwhile changed what "previous" is.
        state = read_state(server)
        target = to or state.previous()
        if target is None:
            raise DeployError(f"{server.name} has no verified release older than {state.current} to roll back to.")
        if target not in state.releases:
            raise DeployError(f"{server.name} has no release {target}; releases: {', '.join(state.releases)}.")
        with progress.step(f"compare the database's migrations with {target}'s"):
            report = SchemaReport.read(server, layout.releases / target)
        if restore:
            record = backup.find(server, restore)
            progress.say(
                f"   {state.current} -> {target}, the database back to {restore} (taken for {record['release']}): "
                "every write made since that backup is LOST"
            )
            _restore_locked(server, record, progress, then=lambda: _rollback_to(server, target, progress))
        elif report.unknown and unapply:
            current_dir = layout.releases / (state.current or target)
            with progress.step(f"check that {state.current}'s code can reverse {', '.join(report.unknown)}"):
                names = schema.unapply(server, current_dir, list(report.unknown), check=True)
            with maintenance_window(server, progress, "migrations are unapplied"):
                _stop_all(server, progress)
                with progress.step(f"unapply {', '.join(names)} with {state.current}'s code"):
                    schema.unapply(server, current_dir, list(report.unknown))
                _rollback_to(server, target, progress)
        elif report.unknown and not keep_schema:
            raise DeployError(
                schema.refuse_rollback(target, state.current, report.unknown, _backup_before(server, target, state))
            )
        else:
            if report.unknown:
                progress.say(f"   --keep-schema: {target} runs against {', '.join(report.unknown)}, which it lacks")
            progress.say(f"   {state.current} -> {target} (the schema is left as it is)")
            _rollback_to(server, target, progress)
    progress.say(progress.summary(f"{target} is live"))
    return target


def _backup_before(server: Server, target: str, state: ServerState) -> str | None:
    """The backup the live release's deploy took before it migrated, else the first deploy's after `target`
    (taken while `target` was live)."""
    deploys = [r for r in backup.records(server)[0] if r["kind"] == "deploy" and r["release"] > target]
    ours = [r for r in deploys if r["release"] == state.current]
    chosen = ours[-1:] or deploys[:1]
    return chosen[0]["name"] if chosen else None


def _restore_locked(server: Server, record: dict, progress: Progress, then) -> None:
    """Back up the database, then (maintenance page on, programs stopped) put `record` back; `then` restarts."""
    with progress.step("back up the database it replaces"):
        state = read_state(server)
        saved = backup.take(server, "restore", state.current)
        progress.say(f"   {saved['name']} ({backup.size(saved['size'])}, {saved['seconds']:.1f} s)")
    with maintenance_window(server, progress, f"restoring {record['name']}"):
        _stop_all(server, progress)
        with progress.step(f"restore {record['name']} (one transaction)"):
            done = backup.restore(server, record["name"])
            progress.say(f"   restored in {done['seconds']:.1f} s")
        try:
            then()
        except DeployError as exc:
            raise DeployError(
                f"{exc} -- the database holds {record['name']} (taken for {record['release']}) now; the one it "
                f"replaced is {saved['name']} (`fab restore {saved['name']} --yes` puts it back)."
            ) from exc


def backup_now(conn: Connection, config: DeployConfig, *, download: Path | None = None) -> str:
    """Take a backup (named after the live release); `download` copies it to this machine."""
    server = connect(conn, config)
    state = read_state(server)
    record = backup.take(server, "manual", state.current)
    line = f"{record['name']}: {backup.size(record['size'])} in {record['seconds']:.1f} s, sha256 {record['sha256']}"
    if download:
        line += f"\ndownloaded to {backup.download(server, record, download)} (sha256 checked)"
    return line


def list_backups(conn: Connection, config: DeployConfig) -> str:
    found, now = backup.records(connect(conn, config))
    return backup.format_list(found, now)


def restore(conn: Connection, config: DeployConfig, name: str, *, yes: bool = False) -> str:
    """Put backup `name` back (the current state backed up first), restart the live release and verify it."""
    progress = Progress(f"restore {name} on {conn.host}")
    with progress.step("connect and check the server"):
        server = connect(conn, config)
        state = read_state(server)
        state.require_provisioned(server)
        record = backup.find(server, name)
    if not yes:
        raise DeployError(
            f"restoring {name} (taken for {record['release']}) replaces the whole database: every write made since "
            "is lost (the current state is backed up first); run again with --yes."
        )
    if not state.current:
        raise DeployError(f"{server.name} has no live release to restart after the restore; `fab deploy` first.")

    def restart() -> None:
        _activate(server, state, state.current, state.live_programs or _render(server, state), progress)

    with _locked(server, f"restore {name}", progress):
        _restore_locked(server, record, progress, then=restart)
    return progress.summary(f"{name} restored; {state.current} serves it")


def plan(conn: Connection, config: DeployConfig, repo: Path) -> str:
    """What `deploy` would do, touching nothing: the release, the virtualenv, the programs config diff."""
    source = release.local_source(repo)
    server = connect(conn, config)
    state = read_state(server)
    state.require_provisioned(server)
    rendered = _render(server, state)
    venv = "reused" if source.lock_hash in state.ready_venvs else "built (requirements.lock changed)"
    dirty = f" ({len(source.dirty)} uncommitted change(s) NOT shipped)" if source.dirty else ""
    commits = source.commits_since(state.current)
    new_migrations = sorted(source.migrations() - release.live_migrations(server)) if state.current else []
    lines = [
        f"deploy plan for {server.name} (environment {config.name})",
        f"  ship:        HEAD {source.short}{dirty}",
        f"  live now:    {state.current or 'nothing'}",
        *(f"  commits:     {line}" for line in commits[:20]),
        f"  virtualenv:  venvs/{source.lock_hash} {venv}",
        f"  migrations:  {', '.join(Path(m).name for m in new_migrations) or 'none new'}",
        "  prepare:     check the new migrations, check --deploy, collectstatic, back up (with new migrations),"
        " migrate, seed_schedules; then switch current",
        f"  releases:    {len(state.releases)} on the server; the newest {config.keep_releases} are kept",
    ]
    if state.live_programs == rendered:
        lines.append("  programs:    programs.conf unchanged; rolling restart (web one at a time), worker, beat")
    else:
        lines.append("  programs:    programs.conf changes; `supervisorctl update` restarts the whole group:")
        lines.append(config_diff(state.live_programs, rendered).rstrip())
    return "\n".join(lines)


def status(conn: Connection, config: DeployConfig) -> str:
    """Each program's state, the live release, the releases kept, the certificate's expiry, the schedules beat runs."""
    server = connect(conn, config)
    return "\n".join(status_lines(server, read_state(server)))


def status_lines(server: Server, state: ServerState, *, programs: bool = True) -> list[str]:
    """`status`'s lines; without `programs`, only what the whole site shares (certificate, lock, backups, schedules)."""
    config = server.config
    lines = [f"{server.name}: live release {state.current or 'none'}"] if programs else []
    if config.domain and not config.multi_host:  # a cluster's certificate is on its balancer
        lines.append(tls.certificate_line(config, tls.read_certificate(server), time.time()))
    held = DeployLock(server, "status").holder()
    if held:
        lines.append(
            f"deploy lock: {held.get('holder', '?')} ({held.get('action', '?')}), last step {held['idle']} s ago"
        )
    try:
        lines.append(backup.freshness(*backup.records(server)))
    except DeployError as exc:
        lines.append(f"backups: unavailable ({exc})")
    if programs:
        out = server.supervisorctl("status", what="supervisorctl status", warn=True).stdout.rstrip()
        lines += ["programs:", *(f"  {line}" for line in out.splitlines())]
        lines.append("releases:")
        for r in state.releases:
            live = "  (live)" if r == state.current else ""
            lines.append(f"  {r}{live}{'' if r in state.deployed else '  (rolled back from)'}")
    if state.current:
        try:
            answer = server.helper(config.layout.current, "schedules", what="reading schedules", timeout=60)
            lines.append("schedules (beat, DatabaseScheduler):")
            for row in answer[-1]["schedules"]:
                flag = "on " if row["enabled"] else "off"
                lines.append(f"  {flag} {row['name']}: {row['task']} {row['schedule']} (last run {row['last_run']})")
        except DeployError as exc:
            lines.append(f"schedules: unavailable ({exc})")
    return lines


def logs(
    conn: Connection, config: DeployConfig, program: str | None = None, lines: int = 100, follow: bool = False
) -> str:
    """The last lines of a program's log (all programs without PROGRAM); `follow` keeps streaming."""
    server = connect(conn, config)
    paths = [log_path(server, name) for name in Programs.from_config(config).select(program).all]
    if follow:
        server.root(sh("tail", "-n", lines, "-F", *paths), what="following logs", hide=False, pty=True, warn=True)
        return ""
    return server.root(sh("tail", "-n", lines, *paths), what="reading logs", warn=True).stdout


def restart_programs(conn: Connection, config: DeployConfig, program: str | None = None) -> str:
    """Restart one program (web: one port at a time, each checked) or all of them, on the live release."""
    progress = Progress(f"restart {program or 'all programs'} on {conn.host}")
    server = connect(conn, config)
    state = read_state(server)
    state.require_provisioned(server)
    if not state.current:
        raise DeployError(f"{server.name} has no live release; run `fab deploy` first.")
    subset = Programs.from_config(config).select(program)
    host = verify.health_host(state.env_values(server))
    with _locked(server, f"restart {program or 'all'}", progress):
        state = read_state(server)  # under the lock: the release live now
        release_dir = config.layout.releases / state.current
        result = rolling_restart(
            server,
            subset,
            lambda port: verify.check_web(server, release_dir, state.current, port, host),
            progress.step,
        )
        if subset.others:
            with progress.step("wait for worker and beat"):
                if result is not None and result.exited != 0:
                    raise DeployError(f"restarting {', '.join(subset.others)}: {result.stdout.strip()[:500]}")
                wait_running(server, subset.others)
    return progress.summary("restarted " + ", ".join(n.split(":")[-1] for n in subset.all))


def supervisorctl(conn: Connection, config: DeployConfig, command: str) -> int:
    """Run `supervisorctl COMMAND` on the server against the app's supervisord; returns its exit code."""
    server = connect(conn, config)
    pty = command.split()[:1] == ["tail"] and "-f" in command.split()
    result = server.supervisorctl(
        *shlex.split(command or "status"), what="supervisorctl", warn=True, hide=False, pty=pty
    )
    return result.exited


def unlock(conn: Connection, config: DeployConfig) -> str:
    """Break the deploy lock of a deploy that died (Ctrl-C, lost connection); says whose it was."""
    server = connect(conn, config)
    lock = DeployLock(server, "unlock")
    held = lock.holder()
    if held is None:
        return f"{server.name} is not locked."
    lock.break_lock()
    return f"removed the deploy lock of {held.get('holder', '?')} ({held.get('action', '?')})."
