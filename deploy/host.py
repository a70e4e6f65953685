"""One host's steps of a command: upload and build, prepare, activate, roll back to a release, stop, start,
restart; each on a member of the site (its checked connection, its state, its own progress lines)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deploy import release, schema, verify
from deploy.errors import DeployError
from deploy.processes import Programs, rolling_restart, wait_running
from deploy.progress import Progress
from deploy.render.supervisord import render_supervisord_conf, server_context
from deploy.ssh import Server
from deploy.state import ServerState, read_state

if TYPE_CHECKING:
    from deploy.site import Member


def render(server: Server, state: ServerState) -> str:
    """This host's programs config; a bad context or env value fails here, before anything is uploaded."""
    context = server_context(
        server.config, state.env_values(server), home=server.app_home, web_ports=server.config.web_ports
    )
    return render_supervisord_conf(context)


def upload_and_build(member: Member, source: release.Source, release_id: str) -> None:
    """Unpack the release and link its virtualenv, built from requirements.lock unless one is ready."""
    server, steps = member.server, member.progress
    with steps.step(f"upload {release_id}"):
        release.upload_release(server, source, release_id, member.programs_text)
    ready = source.lock_hash in member.state.ready_venvs
    if ready and release.venv_runs(server, source.lock_hash):
        steps.say(f"   virtualenv venvs/{source.lock_hash} reused (requirements.lock unchanged)")
    else:
        if ready:
            steps.say(f"   virtualenv venvs/{source.lock_hash}: its Python no longer starts (the server's changed?)")
        with steps.step(f"build virtualenv venvs/{source.lock_hash} from requirements.lock"):
            release.build_venv(
                server, server.config.layout.releases / release_id / "requirements.lock", source.lock_hash
            )


def prepare(member: Member, release_id: str) -> None:
    """check --deploy and collectstatic as the build user; the static files then become root's."""
    release_dir = member.server.config.layout.releases / release_id
    with member.progress.step("prepare: check --deploy, collectstatic (as the build user)"):
        member.server.helper(
            release_dir, "prepare", "--stage", "before", what="prepare",
            on_lines=report_steps(member.progress, []), build=True,
        )  # fmt: skip
        release.seal_static(member.server, release_id)


def report_steps(progress: Progress, seen: list[dict]):
    """An `on_lines` for the prepare helper: each step's outcome and warnings printed, every line kept in `seen`."""

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


def undo_migrations(member: Member, release_id: str, applied: list[str], saved: dict | None) -> str:
    """Unapply the migrations a failed deploy applied (with its own code); a sentence on the database's state."""
    if not applied:
        return "no migration was applied"
    release_dir = member.server.config.layout.releases / release_id
    try:
        with member.progress.step(f"unapply the {len(applied)} migration(s) this deploy applied"):
            undone = schema.unapply(member.server, release_dir, applied)
        return f"the migrations it applied were unapplied ({', '.join(undone)}): the schema is as before"
    except DeployError as exc:
        back = (
            f"`fab restore {saved['name']} --yes` puts back the database of before the deploy (writes since are lost)"
            if saved
            else "no backup was taken"
        )
        return f"the database KEEPS the migrations {', '.join(applied)} ({exc}); {back}"


def activate(member: Member, state: ServerState, release_id: str, programs_text: str) -> None:
    """Make `release_id` live: switch `current`, load its programs, restart each as it needs, verify, mark it.

    Only the programs of the host's roles run and are checked.
    """
    server, progress = member.server, member.progress
    layout = server.config.layout
    release_dir = layout.releases / release_id
    programs = Programs.from_config(server.config)
    workers = server.config.runs("worker")
    health = verify.health_host(state.env_values(server))
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
                verify.check_web(server, release_dir, release_id, port, health)
        if workers:
            with progress.step("verify: a worker of this release runs the ping task"):
                progress.say(f"   answered by {verify.check_worker(server, release_dir, release_id, programs_text)}")
    else:
        with progress.step(f"switch current -> {release_id}"):
            server.root(switch, what="switching current")
        _roll(member, programs, release_dir, release_id, health, ping)
    _verify_live(member, state, programs, release_dir)


def _roll(member: Member, programs: Programs, release_dir, release_id: str, health: str, ping: str | None) -> None:
    """Restart `programs` the way a deploy does (web one port at a time, each checked; the worker's warm shutdown,
    then `ping` once the workers are back; beat stopped, then started); with a ping, the worker's answer is checked."""
    server, progress = member.server, member.progress
    result = rolling_restart(
        server,
        programs,
        lambda port: verify.check_web(server, release_dir, release_id, port, health),
        progress.step,
        after_workers=ping,
    )
    if ping is not None:
        with progress.step("verify: a worker of this release ran the ping task"):
            progress.say(f"   answered by {verify.worker_answer(server, result)}")


def _verify_live(member: Member, state: ServerState, programs: Programs, release_dir) -> None:
    """The checks after any restart of a release: beat leads (where it runs), every program runs, writes work."""
    server, progress = member.server, member.progress
    if server.config.runs("beat"):
        with progress.step("verify: beat runs the DatabaseScheduler; one beat leads"):
            progress.say(f"   leader: {verify.check_beat(server, state.beat_log_size, release_dir)}")
    wait_running(server, programs.all, timeout=10)
    with progress.step("verify: migrate --check; a request written through the API serializer, rolled back"):
        server.helper(release_dir, "verify-writes", what="verifying that writes work", timeout=120)


def reactivate(member: Member) -> None:
    """Restart and verify the live release as it is (after a restore), with its programs config."""
    state = member.state
    activate(member, state, state.current, state.live_programs or render(member.server, state))


def rollback_to(member: Member, target: str) -> None:
    """Make an earlier release live again, with the programs config it was deployed with.

    The release rolled back from loses its verified mark, so the next rollback skips it.
    """
    server = member.server
    state = read_state(server)
    stored = server.read(release.history_path(server, target), what="reading the release's programs config")
    activate(member, state, target, stored or render(server, state))
    if state.current and state.current != target:
        release.unmark(server, state.current)
    release.finish(server, state, target, state.venvs.get(target, ""))


def return_to(member: Member, release_id: str) -> None:
    """Make `release_id` live again with the programs config it was deployed with, verified and marked so: the way
    back after a switch away from it failed."""
    server = member.server
    state = read_state(server)
    stored = server.read(release.history_path(server, release_id), what="reading the release's programs config")
    activate(member, state, release_id, stored or render(server, state))
    release.finish(server, state, release_id, state.venvs.get(release_id, ""))


def stop(member: Member) -> None:
    """Stop web, worker and beat (the worker warm: running tasks finish), e.g. while the schema changes."""
    with member.progress.step("stop web, worker and beat"):
        member.server.supervisorctl("stop", *member.programs.all, what="stopping the programs")


def start(member: Member) -> None:
    with member.progress.step("start the programs again"):
        member.server.supervisorctl("start", *member.programs.all, what="starting")


def restart(member: Member, subset: Programs) -> None:
    """Restart `subset` of the live release's programs (web one port at a time, each checked); the caller holds the
    lock and has read the state under it."""
    server, state, progress = member.server, member.state, member.progress
    if not state.current:
        raise DeployError(f"{server.name} has no live release; run `fab deploy` first.")
    release_dir = server.config.layout.releases / state.current
    health = verify.health_host(state.env_values(server))
    result = rolling_restart(
        server,
        subset,
        lambda port: verify.check_web(server, release_dir, state.current, port, health),
        progress.step,
    )
    if subset.others:
        with progress.step("wait for worker and beat"):
            if result is not None and result.exited != 0:
                raise DeployError(f"restarting {', '.join(subset.others)}: {result.stdout.strip()[:500]}")
            wait_running(server, subset.others)


def reload_environment(member: Member, env_values: dict[str, str]) -> None:
    """Restart the live release's programs to read a changed environment the way a deploy does (web one port at a
    time, each checked; the worker's warm shutdown; beat stopped, then started), then verify: a worker of the release
    runs the ping task, beat leads, writes work. The caller holds the lock and has read the state under it."""
    server, state = member.server, member.state
    release_id = state.current
    release_dir = server.config.layout.releases / release_id
    programs = member.programs
    workers = server.config.runs("worker")
    health = verify.health_host(env_values)
    ping = verify.ping_command(server, release_dir, release_id, state.live_programs or "") if workers else None
    _roll(member, programs, release_dir, release_id, health, ping)
    _verify_live(member, state, programs, release_dir)
