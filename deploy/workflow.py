"""The operator's commands, one function each (fabfile.py wraps them): deploy, rollback, plan, status, ..."""

from __future__ import annotations

import shlex
from pathlib import Path

from fabric import Connection

from deploy import processes, release, verify
from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.lock import DeployLock
from deploy.onserver import read_env_file
from deploy.processes import Programs
from deploy.progress import Progress
from deploy.remote import Server, connect, sh
from deploy.render import render_supervisord_conf, server_context


def _env_values(server: Server) -> dict[str, str]:
    text = server.read(server.config.layout.env_file, what="reading the env file")
    if text is None:
        raise DeployError(
            f"{server.name} has no env file at {server.config.layout.env_file}; run `fab provision` first."
        )
    try:
        return read_env_file(text)
    except ValueError as exc:
        raise DeployError(f"{server.config.layout.env_file} on {server.name}: {exc}.") from exc


def _render(server: Server) -> tuple[dict, str]:
    config = server.config
    context = server_context(config, _env_values(server), home=server.app_home, web_ports=config.web_ports)
    return context, render_supervisord_conf(context)


def _check_provisioned(server: Server) -> None:
    layout = server.config.layout
    if server.root(sh("test", "-d", layout.root), what="looking for the app directory", warn=True).exited != 0:
        raise DeployError(f"{server.name} has no {layout.root}; run `fab provision` first.")
    processes.check_supervisord(server)


def _activate(
    server: Server, release_id: str, config_text: str, context: dict, config_changed: bool, progress: Progress
) -> None:
    """Make `release_id` live: switch `current`, load its programs, restart them, verify; mark it deployed."""
    layout = server.config.layout
    release_dir = layout.releases / release_id
    programs = Programs.from_context(context)
    beat = programs.others[-1]
    beat_offset = processes.log_size(server, beat)
    with progress.step(f"switch current -> {release_id}"):
        release.switch_current(server, release_id)

    def web_ok(name: str, port: int) -> None:
        verify.check_web(server, release_dir, release_id, port)

    if config_changed:
        with progress.step("install programs.conf and `supervisorctl update` (the whole group restarts)"):
            processes.install_config(server, config_text)
            processes.apply_config(server)
            processes.wait_running(server, programs.all, timeout=server.config.health_timeout)
        for name, port in programs.web:
            with progress.step(f"check {name.split(':')[-1]} (port {port})"):
                web_ok(name, port)
    else:
        processes.rolling_restart(server, programs, web_ok, progress.step)
    with progress.step("verify: a worker of this release runs the ping task"):
        host = verify.check_worker(server, release_dir, release_id)
        progress.say(f"   ping answered by {host}")
    with progress.step("verify: beat runs the DatabaseScheduler"):
        verify.check_beat(server, beat, beat_offset)
        processes.wait_running(server, programs.all, timeout=10)
    release.mark_deployed(server, release_id)


def deploy(conn: Connection, config: DeployConfig, repo: Path, *, allow_dirty: bool = False) -> str:
    """Ship HEAD of `repo` to the server, make it live and verify it; roll back on any failure. Returns the id."""
    source = release.local_source(repo)
    if source.dirty and not allow_dirty:
        listed = ", ".join(source.dirty[:5]) + (" ..." if len(source.dirty) > 5 else "")
        raise DeployError(
            f"the work tree has uncommitted changes ({listed}); commit them, or pass --allow-dirty to ship "
            f"HEAD {source.short} without them."
        )
    progress = Progress(f"deploy {source.short} to {conn.host}")
    if source.dirty:
        progress.say(f"WARNING: shipping HEAD {source.short}; {len(source.dirty)} uncommitted change(s) stay behind.")
    with progress.step("connect and check the server"):
        server = connect(conn, config)
        _check_provisioned(server)
        context, config_text = _render(server)  # a bad context fails here, before anything is uploaded
    lock = DeployLock(server, f"deploy {source.short}")
    with progress.step("take the deploy lock"):
        lock.acquire()
    try:
        progress.heartbeat = lock.refresh
        release_id = _deploy_locked(server, source, context, config_text, progress)
    except BaseException as exc:
        progress.say(progress.summary(f"FAILED ({type(exc).__name__})"))
        raise
    finally:
        lock.release()
    progress.say(progress.summary(f"{release_id} is live"))
    return release_id


def _deploy_locked(server: Server, source, context: dict, config_text: str, progress: Progress) -> str:
    state = release.server_state(server)
    previous = state.current
    release_id = source.release_id()
    with progress.step(f"upload {release_id}"):
        release.upload_release(server, source, release_id)
    try:
        with progress.step("virtualenv for requirements.lock " + source.lock_hash):
            built = release.ensure_venv(server, release_id, source.lock_hash)
            progress.say(f"   {'built' if built else 'reused'} venvs/{source.lock_hash}")
        with progress.step("prepare: check --deploy, migrate, seed_schedules, collectstatic"):

            def report(lines: list[dict]) -> None:
                for line in lines:
                    if "step" in line:
                        progress.say(
                            f"   {'ok' if line.get('ok') else 'FAILED'}  {line['step']} ({line['seconds']:.1f} s)"
                        )

            server.helper(server.config.layout.releases / release_id, "prepare", what="prepare", on_lines=report)
        with progress.step("keep this release's supervisord programs"):
            processes.store_config(server, release_id, config_text)
            live = processes.live_config(server)
    except BaseException as exc:
        release.remove_release(server, release_id)
        serving = f"{previous} keeps serving" if previous else "nothing was live"
        if isinstance(exc, DeployError):
            raise DeployError(f"{exc} -- stopped before the switch; {serving}.") from exc
        raise
    try:
        _activate(server, release_id, config_text, context, live != config_text, progress)
    except BaseException as exc:
        reason = str(exc) or type(exc).__name__
        if previous is None:
            raise DeployError(f"{reason} -- and there is no earlier release to roll back to.") from exc
        progress.say(f"!! {reason}\n!! rolling back to {previous}")
        try:
            _rollback_to(server, previous, config_text, progress)
        except DeployError as again:
            raise DeployError(f"{reason} -- and the rollback to {previous} failed too: {again}") from exc
        release.remove_release(server, release_id)
        if isinstance(exc, DeployError):
            raise DeployError(f"deploy of {release_id} failed and was rolled back to {previous}: {reason}") from exc
        raise
    with progress.step("prune old releases and virtualenvs"):
        removed = release.prune(server, release.server_state(server))
        if removed:
            progress.say(f"   removed {', '.join(removed)}")
    return release_id


def _rollback_to(server: Server, target: str, live_text: str | None, progress: Progress) -> None:
    """Make an earlier release live again with the programs config it was deployed with."""
    stored = processes.stored_config(server, target)
    context, rendered = _render(server)
    text = stored or rendered
    _activate(server, target, text, context, (live_text or "") != text, progress)


def rollback(conn: Connection, config: DeployConfig, *, to: str | None = None) -> str:
    """Back to the previous verified release (code, virtualenv, programs config); the database is left alone."""
    progress = Progress(f"rollback on {conn.host}")
    with progress.step("connect and check the server"):
        server = connect(conn, config)
        _check_provisioned(server)
        state = release.server_state(server)
        target = to or state.previous()
        if target is None:
            raise DeployError(
                f"{server.name} has no earlier verified release than {state.current}; nothing to roll back to."
            )
        if target not in state.releases:
            raise DeployError(f"{server.name} has no release {target}; releases: {', '.join(state.releases)}.")
    lock = DeployLock(server, f"rollback to {target}")
    with progress.step("take the deploy lock"):
        lock.acquire()
    try:
        progress.heartbeat = lock.refresh
        progress.say(f"   {state.current} -> {target} (database untouched)")
        _rollback_to(server, target, processes.live_config(server), progress)
    except BaseException as exc:
        progress.say(progress.summary(f"FAILED ({type(exc).__name__})"))
        raise
    finally:
        lock.release()
    progress.say(progress.summary(f"{target} is live"))
    return target


def plan(conn: Connection, config: DeployConfig, repo: Path) -> str:
    """What `deploy` would do, touching nothing: the release, the virtualenv, the programs config diff."""
    source = release.local_source(repo)
    server = connect(conn, config)
    _check_provisioned(server)
    state = release.server_state(server)
    context, rendered = _render(server)
    live = processes.live_config(server)
    lines = [
        f"deploy plan for {server.name} (environment {config.name})",
        f"  ship:        HEAD {source.short}"
        + (f" ({len(source.dirty)} uncommitted change(s) NOT shipped)" if source.dirty else ""),
        f"  live now:    {state.current or 'nothing'}",
        f"  virtualenv:  venvs/{source.lock_hash} "
        + ("reused" if release.venv_ready(server, source.lock_hash) else "to build (requirements.lock changed)"),
        "  then:        check --deploy, migrate, seed_schedules, collectstatic; switch current",
        f"  releases:    {len(state.releases)} kept now, keep {config.keep_releases}",
    ]
    if live == rendered:
        lines.append("  programs:    programs.conf unchanged -> rolling restart (web one at a time), worker, beat")
    else:
        lines.append("  programs:    programs.conf changes -> `supervisorctl update` restarts the whole group:")
        lines.append(processes.config_diff(live, rendered).rstrip())
    return "\n".join(lines)


def status(conn: Connection, config: DeployConfig) -> str:
    """Each program's state, the live release, the releases kept, and the schedules beat runs."""
    server = connect(conn, config)
    state = release.server_state(server)
    lines = [f"{server.name}: live release {state.current or 'none'}"]
    out = server.supervisorctl("status", what="supervisorctl status", warn=True).stdout.rstrip()
    lines += ["programs:", *(f"  {line}" for line in out.splitlines())]
    marks = [
        f"  {r}{'  (live)' if r == state.current else ''}{'' if r in state.deployed else '  (not verified)'}"
        for r in state.releases
    ]
    lines += ["releases:", *marks]
    if state.current:
        try:
            rows = server.helper(config.layout.current, "schedules", what="reading schedules", timeout=60)[-1][
                "schedules"
            ]
            lines.append("schedules (DatabaseScheduler):")
            for row in rows:
                flag = "on " if row["enabled"] else "off"
                lines.append(f"  {flag} {row['name']}: {row['task']} {row['schedule']} (last run {row['last_run']})")
        except DeployError as exc:
            lines.append(f"schedules: unavailable ({exc})")
    return "\n".join(lines)


def _names(server: Server, program: str | None) -> tuple[Programs, list[str]]:
    context, _ = _render(server)
    programs = Programs.from_context(context)
    if not program:
        return programs, list(programs.all)
    wanted = [n for n in programs.all if n.split(":")[-1] == program or n.split(":")[-1].startswith(f"{program}-")]
    if not wanted:
        known = ", ".join(sorted({n.split(":")[-1] for n in programs.all} | {"web", "worker"}))
        raise DeployError(f"unknown program {program!r}; programs: {known}.")
    return programs, wanted


def logs(
    conn: Connection, config: DeployConfig, program: str | None = None, lines: int = 100, follow: bool = False
) -> str:
    """The last lines of a program's log (all of them without PROGRAM); --follow keeps streaming."""
    server = connect(conn, config)
    _, names = _names(server, program)
    paths = [processes.log_path(server, name) for name in names]
    if follow:
        server.root(sh("tail", "-n", lines, "-F", *paths), what="following logs", hide=False, pty=True, warn=True)
        return ""
    return server.root(sh("tail", "-n", lines, *paths), what="reading logs", warn=True).stdout


def restart(conn: Connection, config: DeployConfig, program: str | None = None) -> str:
    """Restart one program (web: one port at a time) or all of them, then check the live release."""
    progress = Progress(f"restart {program or 'all'} on {conn.host}")
    server = connect(conn, config)
    processes.check_supervisord(server)
    state = release.server_state(server)
    if not state.current:
        raise DeployError(f"{server.name} has no live release; run `fab deploy` first.")
    programs, names = _names(server, program)
    release_dir = config.layout.current
    web = tuple((n, p) for n, p in programs.web if n in names)
    others = tuple(n for n in programs.others if n in names)
    subset = Programs(web=web, others=others)
    check = lambda name, port: verify.check_web(server, release_dir, state.current, port)  # noqa: E731
    if others:
        processes.rolling_restart(server, subset, check, progress.step)
    else:
        for name, port in web:
            with progress.step(f"restart {name.split(':')[-1]} (port {port}) and check it"):
                processes.restart(server, name)
                check(name, port)
    return progress.summary("restarted " + ", ".join(n.split(":")[-1] for n in names))


def supervisorctl(conn: Connection, config: DeployConfig, command: str) -> int:
    """Run `supervisorctl COMMAND` on the server against the app's supervisord; returns its exit code."""
    server = connect(conn, config)
    result = server.supervisorctl(*shlex.split(command or "status"), what="supervisorctl", warn=True, hide=False)
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
