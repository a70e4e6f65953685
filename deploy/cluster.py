"""A cluster (an environment with roles): deploy, rollback, status, logs and restart across its hosts as one.

One deploy lock per host, all taken before anything changes; upload and virtualenv builds in parallel;
the schema checked, backed up and migrated once, on the primary; then each host switched and restarted in
turn (web hosts one at a time, then worker hosts, then beat hosts), each verified on its own (its web
ports, a ping through its own queue, one beat leader); a failure anywhere puts every host back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from fabric import Connection

from deploy import backup, release, schema, tls, workflow
from deploy.config import APP_ROLES, DeployConfig, address_of, has_app
from deploy.errors import DeployError
from deploy.lock import DeployLock
from deploy.maintenance import window as maintenance_window
from deploy.processes import Programs, log_path
from deploy.progress import PrefixedLines, Progress, in_parallel
from deploy.remote import Server, connect, sh
from deploy.schema import SchemaReport
from deploy.state import ServerState, read_state

R = TypeVar("R")


def rollout_order(config: DeployConfig, hosts: Sequence[str]) -> list[str]:
    """The app hosts in switch order: web hosts (one at a time), then the other worker hosts, then beat hosts."""
    order: list[str] = []
    for role in APP_ROLES:
        order += [h for h in config.role_hosts(role) if h in hosts and h not in order]
    return order


@dataclass
class Member:
    """One app host of the cluster during a command: its checked connection, state and own progress lines."""

    host: str
    server: Server
    progress: Progress
    state: ServerState | None = None
    programs_text: str = ""

    @property
    def label(self) -> str:
        return self.host.rpartition("@")[2]

    @property
    def roles(self) -> str:
        return ",".join(role for role in (*APP_ROLES, "db", "balancer") if self.server.config.runs(role))


class Cluster:
    """The hosts of an environment with roles, connected and checked."""

    def __init__(self, config: DeployConfig, conns: Sequence[Connection], progress: Progress):
        self.config = config
        by_address = {conn.host: conn for conn in conns}
        self.progress = progress

        def open_one(host: str) -> tuple[str, Server]:
            host_config = config.for_host(host)
            conn = by_address[address_of(host)]
            return host, connect(conn, host_config)

        apps = [h for h in config.site_hosts if has_app(config.for_host(h))]
        missing = [h for h in apps if address_of(h) not in by_address]
        if missing:
            raise DeployError(f"no connection to {', '.join(missing)}: a cluster command acts on all its hosts.")
        width = max(len(address_of(h)) for h in apps)
        opened = in_parallel(open_one, apps, name=lambda h: h)
        lines = threading.Lock()
        self.members = {
            host: Member(
                host,
                server,
                Progress(progress.title, out=PrefixedLines(f"[{address_of(host):<{width}}] ", progress.out, lines)),
            )
            for host, server in opened
        }
        self.order = [self.members[h] for h in rollout_order(config, list(self.members))]
        self.primary = self.members[config.primary]

    def read_states(self) -> None:
        def read(member: Member) -> None:
            member.state = read_state(member.server)
            member.state.require_provisioned(member.server)

        in_parallel(read, self.order, name=lambda m: m.host)

    def each(self, action: Callable[[Member], R]) -> list[R]:
        return in_parallel(action, self.order, name=lambda m: m.host)

    @contextmanager
    def locked(self, action: str) -> Iterator[list[DeployLock]]:
        """Every app host's deploy lock, taken in the config's order (two cluster deploys cannot deadlock), released
        at the end; a failure prints the summary."""
        locks: list[DeployLock] = []
        with self.progress.step(f"take the deploy lock on all {len(self.order)} hosts"):
            try:
                for member in sorted(self.order, key=lambda m: self.config.site_hosts.index(m.host)):
                    lock = DeployLock(member.server, action)
                    lock.acquire()
                    locks.append(lock)
            except BaseException:
                for lock in locks:
                    lock.release()
                raise
        last = [time.monotonic()]

        def heartbeat() -> None:
            if time.monotonic() - last[0] > 30:
                for lock in locks:
                    lock.refresh()
                last[0] = time.monotonic()

        self.progress.heartbeat = heartbeat
        for member in self.order:
            member.progress.heartbeat = heartbeat
        try:
            yield locks
        except BaseException as exc:
            self.progress.say(self.progress.summary(f"FAILED ({type(exc).__name__})"))
            raise
        finally:
            for lock in locks:
                lock.release()

    @contextmanager
    def maintenance(self, reason: str) -> Iterator[None]:
        """The maintenance page on every web host and every program stopped, for the block."""
        with ExitStack() as stack:
            for member in self.order:
                if member.server.config.runs("web"):
                    stack.enter_context(maintenance_window(member.server, member.progress, reason))
            for member in self.order:
                workflow._stop_all(member.server, member.progress)
            yield

    def start_all(self) -> None:
        for member in self.order:
            programs = Programs.from_config(member.server.config).all
            with member.progress.step("start the programs again"):
                member.server.supervisorctl("start", *programs, what="starting")


def deploy(
    conns: Sequence[Connection],
    config: DeployConfig,
    repo: Path,
    *,
    allow_dirty: bool = False,
    maintenance: bool = False,
) -> str:
    """Ship HEAD to every host of the cluster and make it live everywhere, or nowhere. Returns the release id."""
    source = workflow.checked_source(repo, allow_dirty)
    progress = Progress(f"deploy {source.short} to the cluster {config.name}")
    if source.dirty:
        progress.say(f"WARNING: shipping HEAD {source.short}; {len(source.dirty)} uncommitted change(s) stay behind.")
    with progress.step(f"connect to the {len(config.site_hosts)} hosts"):
        cluster = Cluster(config, conns, progress)
    with cluster.locked(f"deploy {source.short}"):
        with progress.step("read every host's state; render each one's programs"):
            cluster.read_states()
            for member in cluster.order:
                member.programs_text = workflow._render(member.server, member.state)
        release_id = _deploy_locked(cluster, source, maintenance=maintenance)
    progress.say(progress.summary(f"{release_id} is live on {len(cluster.order)} hosts"))
    return release_id


def _deploy_locked(cluster: Cluster, source, *, maintenance: bool) -> str:
    progress, primary = cluster.progress, cluster.primary
    release_id = source.release_id()
    release_dir = cluster.config.layout.releases / release_id
    previous = {m.host: m.state.current for m in cluster.order}
    live = primary.state.current
    serving = f"{live} keeps serving" if live else "nothing was live"

    def remove_everywhere() -> None:
        for member in cluster.order:
            release.remove_release(member.server, release_id)

    def upload_and_build(member: Member) -> None:
        server, state, steps = member.server, member.state, member.progress
        with steps.step(f"upload {release_id}"):
            release.upload_release(server, source, release_id, member.programs_text)
        if source.lock_hash in state.ready_venvs:
            steps.say(f"   virtualenv venvs/{source.lock_hash} reused (requirements.lock unchanged)")
        else:
            with steps.step(f"build virtualenv venvs/{source.lock_hash} from requirements.lock"):
                release.build_venv(server, release_id, source.lock_hash)

    def prepare(member: Member) -> None:
        with member.progress.step("prepare: check --deploy, collectstatic (as the build user)"):
            member.server.helper(
                release_dir, "prepare", "--stage", "before", what="prepare",
                on_lines=workflow._report_steps(member.progress, []), build=True,
            )  # fmt: skip
            release.seal_static(member.server, release_id)

    saved = None
    try:
        with progress.step(f"upload {release_id} and build its virtualenv on every host (in parallel)"):
            cluster.each(upload_and_build)
        with progress.step(f"check the new migrations against the live release (on {primary.label})"):
            report = SchemaReport.read(primary.server, release_dir)
            progress.say(f"   new migrations: {', '.join(report.new) or 'none'}")
            for item in report.unsafe:
                progress.say(f"   UNSAFE {item['migration']}: {item['problem']}")
            if report.unsafe and live and not maintenance:
                raise DeployError(schema.refuse_unsafe(report.unsafe, live))
        with progress.step("prepare on every host (in parallel)"):
            cluster.each(prepare)
        if report.new and live:
            with progress.step(f"back up the database before migrating (on {primary.label})"):
                saved = backup.take(primary.server, "deploy", release_id)
                progress.say(f"   {saved['name']}: {backup.size(saved['size'])} in {saved['seconds']:.1f} s")
    except BaseException as exc:
        remove_everywhere()
        if isinstance(exc, DeployError):
            raise DeployError(
                f"{exc} -- stopped before any host switched and before any migration; {serving}."
            ) from exc
        raise
    windowed = maintenance and bool(report.new) and live is not None
    with cluster.maintenance("the schema changes") if windowed else nullcontext():
        seen: list[dict] = []
        try:
            with progress.step(f"prepare: migrate, seed_schedules (once, on {primary.label})"):
                primary.server.helper(
                    release_dir, "prepare", "--stage", "migrate", what="prepare",
                    on_lines=workflow._report_steps(progress, seen),
                )  # fmt: skip
        except BaseException as exc:
            applied = workflow.applied_migrations(seen)
            where = workflow._undo_migrations(primary.server, release_dir, applied, saved, progress)
            if windowed:
                cluster.start_all()
            remove_everywhere()
            if isinstance(exc, DeployError):
                raise DeployError(f"{exc} -- failed at the schema step; {where}; {serving} on every host.") from exc
            raise
        applied = workflow.applied_migrations(seen)
        switched: list[Member] = []
        try:
            for member in cluster.order:
                with progress.step(f"switch {member.label} ({member.roles}) to {release_id}, restart, verify"):
                    switched.append(member)
                    workflow._activate(member.server, member.state, release_id, member.programs_text, member.progress)
        except BaseException as exc:
            reason = str(exc) or type(exc).__name__
            failed = switched[-1].label if switched else "?"
            if not any(previous.values()):
                raise DeployError(f"{reason} -- and there is no earlier release to roll back to.") from exc
            progress.say(f"!! {failed}: {reason}\n!! rolling every host back")
            where = workflow._undo_migrations(primary.server, release_dir, applied, saved, progress)
            problems = _roll_back(cluster, switched, previous)
            remove_everywhere()
            if problems:
                raise DeployError(f"{reason} -- and rolling back failed on {'; '.join(problems)}; {where}") from exc
            back = ", ".join(sorted({p for p in previous.values() if p}))
            raise DeployError(
                f"deploy of {release_id} failed on {failed} and every host was rolled back to {back}: {reason}; {where}"
            ) from exc
    with progress.step("mark the release verified on every host; prune old releases and virtualenvs"):
        cluster.each(lambda m: release.finish(m.server, m.state, release_id, source.lock_hash))
    return release_id


def _roll_back(cluster: Cluster, switched: list[Member], previous: dict[str, str | None]) -> list[str]:
    """Put each switched host back on its previous release, in rollout order; the problems, one per host."""
    problems = []
    for member in switched:
        target = previous[member.host]
        try:
            with cluster.progress.step(f"roll {member.label} back to {target}"):
                if target is None:
                    workflow._stop_all(member.server, member.progress)
                else:
                    workflow._rollback_to(member.server, target, member.progress)
        except DeployError as exc:
            problems.append(f"{member.label}: {exc}")
    return problems


def rollback(
    conns: Sequence[Connection],
    config: DeployConfig,
    *,
    to: str | None = None,
    unapply: bool = False,
    restore: str | None = None,
    keep_schema: bool = False,
) -> str:
    """Every host back to the previous verified release (the primary's), refused when the database has migrations
    it lacks unless told what to do with them, as for one host."""
    if sum((unapply, bool(restore), keep_schema)) > 1:
        raise DeployError("choose one of --unapply, --restore BACKUP and --keep-schema.")
    progress = Progress(f"rollback of the cluster {config.name}")
    with progress.step(f"connect to the {len(config.site_hosts)} hosts"):
        cluster = Cluster(config, conns, progress)
    layout = config.layout
    with cluster.locked(f"rollback{' to ' + to if to else ''}"):
        cluster.read_states()
        primary = cluster.primary
        current = primary.state.current
        target = to or primary.state.previous()
        if target is None:
            raise DeployError(f"{primary.label} has no verified release older than {current} to roll back to.")
        lacking = [m.label for m in cluster.order if target not in m.state.releases]
        if lacking:
            raise DeployError(f"{', '.join(lacking)} have no release {target}; releases there: see `fab status`.")
        with progress.step(f"compare the database's migrations with {target}'s (on {primary.label})"):
            report = SchemaReport.read(primary.server, layout.releases / target)

        def switch_all() -> None:
            for member in cluster.order:
                with progress.step(f"switch {member.label} ({member.roles}) to {target}, restart, verify"):
                    workflow._rollback_to(member.server, target, member.progress)

        if restore:
            record = backup.find(primary.server, restore)
            progress.say(f"   every host -> {target}, the database back to {restore}: writes since are LOST")
            with progress.step(f"back up the database it replaces (on {primary.label})"):
                saved = backup.take(primary.server, "restore", current)
            with cluster.maintenance(f"restoring {record['name']}"):
                with progress.step(f"restore {record['name']} (one transaction)"):
                    backup.restore(primary.server, record["name"])
                try:
                    switch_all()
                except DeployError as exc:
                    raise DeployError(
                        f"{exc} -- the database holds {record['name']} now; the one it replaced is {saved['name']}."
                    ) from exc
        elif report.unknown and unapply:
            current_dir = layout.releases / (current or target)
            with progress.step(f"check that {current}'s code can reverse {', '.join(report.unknown)}"):
                names = schema.unapply(primary.server, current_dir, list(report.unknown), check=True)
            with cluster.maintenance("migrations are unapplied"):
                with progress.step(f"unapply {', '.join(names)} with {current}'s code (on {primary.label})"):
                    schema.unapply(primary.server, current_dir, list(report.unknown))
                switch_all()
        elif report.unknown and not keep_schema:
            raise DeployError(
                schema.refuse_rollback(
                    target, current, report.unknown, workflow._backup_before(primary.server, target, primary.state)
                )
            )
        else:
            if report.unknown:
                progress.say(f"   --keep-schema: {target} runs against {', '.join(report.unknown)}, which it lacks")
            switch_all()
    progress.say(progress.summary(f"{target} is live on {len(cluster.order)} hosts"))
    return target


def select(cluster: Cluster, role: str | None) -> list[Member]:
    """The app hosts with `role` (all of them for None), in rollout order."""
    if role is None:
        return cluster.order
    if role not in APP_ROLES:
        raise DeployError(f"unknown role {role!r} for programs; roles: {', '.join(APP_ROLES)}.")
    return [m for m in cluster.order if m.server.config.runs(role)]


def status(conns: Sequence[Connection], config: DeployConfig, role: str | None = None) -> str:
    """One table for the cluster: each host's roles, live release and programs; then the primary's schedules."""
    progress = Progress(f"status of {config.name}")
    cluster = Cluster(config, conns, progress)
    members = select(cluster, role)

    def rows(member: Member) -> list[tuple[str, ...]]:
        server = member.server
        state = read_state(server)
        out = server.supervisorctl("status", what="supervisorctl status", warn=True).stdout
        programs = [line.split(None, 2) for line in out.splitlines() if line.strip()]
        wanted = set(Programs.from_config(server.config).select(role).all) if role else None
        found = [p for p in programs if wanted is None or p[0] in wanted] or [["-", "no programs", ""]]
        return [
            (member.label, member.roles, state.current or "none", p[0].split(":")[-1], p[1], p[2] if len(p) > 2 else "")
            for p in found
        ]

    table = [("HOST", "ROLES", "RELEASE", "PROGRAM", "STATE", "")]
    for member_rows in in_parallel(rows, members, name=lambda m: m.host):
        table += member_rows
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 5 else cell for i, cell in enumerate(row)).rstrip() for row in table
    ]
    others = [h for h in config.site_hosts if h not in cluster.members]
    for host in others:
        line = f"{address_of(host)}: {','.join(sorted(config.roles_of(host)))} (no programs)"
        if config.domain and host in config.role_hosts("balancer"):
            line += f"; {balancer_certificate(config, conns)}"
        lines.append(line)
    releases = {row[2] for row in table[1:]}
    if len(releases) > 1:
        lines.append(f"WARNING: the hosts run different releases ({', '.join(sorted(releases))}); `fab deploy` again.")
    lines += ["", f"on the primary, {cluster.primary.label}:"]
    lines += workflow.status_lines(cluster.primary.server, read_state(cluster.primary.server), programs=False)
    return "\n".join(lines)


def balancer_certificate(config: DeployConfig, conns: Sequence[Connection]) -> str:
    """`fab status`'s certificate line, read on the balancer (it holds the certificate; it has no app user)."""
    host = config.role_hosts("balancer")[0]
    conn = next(conn for conn in conns if conn.host == address_of(host))
    try:
        server = connect(conn, replace(config.for_host(host), user="root"))
        return tls.certificate_line(config, tls.read_certificate(server), time.time())
    except DeployError as exc:
        return f"certificate: unavailable ({exc})"


def logs(
    conns: Sequence[Connection], config: DeployConfig, program: str | None, lines: int, role: str | None = None
) -> str:
    """The last lines of each program's log on each host (of `role`), each line prefixed with its host."""
    cluster = Cluster(config, conns, Progress("logs"))
    out = []
    for member in select(cluster, role):
        programs = Programs.from_config(member.server.config)
        try:
            names = programs.select(program or role).all
        except DeployError:
            continue
        paths = [log_path(member.server, name) for name in names]
        text = member.server.root(sh("tail", "-n", lines, *paths), what="reading logs", warn=True).stdout
        out += [f"{member.label} | {line}" for line in text.splitlines()]
    return "\n".join(out) + "\n"


def restart(conns: Sequence[Connection], config: DeployConfig, program: str | None, role: str | None = None) -> str:
    """Restart the programs of `role` (or `program`, or all) on each host that has them, one host at a time."""
    progress = Progress(f"restart {program or role or 'all programs'} on {config.name}")
    cluster = Cluster(config, conns, progress)
    done = []
    for member in select(cluster, role):
        names = {n.split(":")[-1] for n in Programs.from_config(member.server.config).all}
        if program and not any(n == program or n.startswith(f"{program}-") for n in names):
            continue
        with progress.step(f"restart {program or role or 'all'} on {member.label}"):
            subset = program or role
            member.progress.say(workflow.restart_programs(member.server.conn, member.server.config, subset))
        done.append(member.label)
    if not done:
        raise DeployError(f"no host of {config.name} runs {program or role}.")
    return progress.summary(f"restarted on {', '.join(done)}")


def restore(conns: Sequence[Connection], config: DeployConfig, name: str, *, yes: bool = False) -> str:
    """Put backup `name` back for the whole cluster: the current state backed up first, the maintenance page on
    every web host and every program stopped meanwhile, then each host restarted and verified."""
    progress = Progress(f"restore {name} on {config.name}")
    with progress.step(f"connect to the {len(config.site_hosts)} hosts"):
        cluster = Cluster(config, conns, progress)
    primary = cluster.primary
    record = backup.find(primary.server, name)
    if not yes:
        raise DeployError(
            f"restoring {name} (taken for {record['release']}) replaces the whole database: every write made since "
            "is lost (the current state is backed up first); run again with --yes."
        )
    with cluster.locked(f"restore {name}"):
        cluster.read_states()
        with progress.step(f"back up the database it replaces (on {primary.label})"):
            saved = backup.take(primary.server, "restore", primary.state.current)
        with cluster.maintenance(f"restoring {name}"):
            with progress.step(f"restore {name} (one transaction)"):
                backup.restore(primary.server, name)
            try:
                for member in cluster.order:
                    state = member.state
                    with progress.step(f"restart and verify {member.label} ({member.roles})"):
                        text = state.live_programs or workflow._render(member.server, state)
                        workflow._activate(member.server, state, state.current, text, member.progress)
            except DeployError as exc:
                raise DeployError(
                    f"{exc} -- the database holds {name} now; the one it replaced is {saved['name']}."
                ) from exc
    return progress.summary(f"{name} restored; {primary.state.current} serves it")


def unlock(conns: Sequence[Connection], config: DeployConfig) -> str:
    cluster = Cluster(config, conns, Progress("unlock"))
    return "\n".join(f"{m.label}: {workflow.unlock(m.server.conn, m.server.config)}" for m in cluster.order)
