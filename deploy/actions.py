"""The operator's commands, one function each over a site (fabfile.py builds the site and calls them): deploy,
plan, rollback, restore, backup, backups, status, logs, restart, supervisorctl, manage, env, unlock, provision,
maintenance, history.

A site of one host and one of many go the same way: the schema is checked, backed up and migrated once, on the
primary; every host is switched and verified in rollout order (web hosts one at a time, then worker hosts, then
beat hosts); a failure anywhere puts every host back.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from deploy import archive, backup, env_sources, environment, history, host, notify, release, schema, tls, updates
from deploy import maintenance as maintenance_page
from deploy import provision as provisioning
from deploy.balancer import read_upstream
from deploy.commands.logs import tail
from deploy.config import address_of
from deploy.errors import DeployError
from deploy.lock import DeployLock
from deploy.on_server.common import read_env_file
from deploy.processes import Programs, config_diff, log_path
from deploy.progress import Progress, in_parallel
from deploy.provision.db_host import ensure_database
from deploy.provision.env_file import env_change_hosts
from deploy.render.env_file import edit_env_file
from deploy.restored import serve_restored
from deploy.schema import SchemaReport
from deploy.site import Member, Site
from deploy.ssh import connect
from deploy.state import ServerState, read_state


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


def deploy(site: Site, repo: Path, *, allow_dirty: bool = False, maintenance: bool = False) -> str:
    """Ship HEAD of `repo` to every host of the site, prepare it, make it live and verify it everywhere, or roll
    every host back. Returns the release id.

    New migrations the live release cannot run against are refused, unless `maintenance` (a 503 window).
    """
    site.require_whole("deploy")
    source = checked_source(repo, allow_dirty)
    progress = Progress(f"deploy {source.short} to {site.name}")
    if source.dirty:
        progress.say(f"WARNING: shipping HEAD {source.short}; {len(source.dirty)} uncommitted change(s) stay behind.")
    site.connect_step(progress)
    author = history.git_author(source.repo)  # the identity the shipped checkout commits with
    with (
        history.recorded(site, "deploy", commit=source.short, author=author) as record,
        site.locked(f"deploy {source.short}"),
    ):
        with progress.step("read the state; render the supervisord programs"):
            site.read_states()
            for member in site.order:  # a bad context fails here, before anything is uploaded
                member.programs_text = host.render(member.server, member.state)
        for warning in dict.fromkeys(
            env_sources.num_proxies_warning(m.server.config, m.state.env_values(m.server)) for m in site.order
        ):
            if warning:
                progress.say(warning)
        if site.primary.state.current:  # a first deploy has no restore behind it
            with progress.step(f"check for an interrupted restore{site.on_primary()}"):
                backup.refuse_after_interrupted_restore(site.primary.server, "deploy")
        release_id = _deploy_locked(site, source, record, maintenance=maintenance)
    progress.say(progress.summary(f"{release_id} is live{site.hosts_phrase()}"))
    return release_id


def _deploy_locked(site: Site, source: release.Source, record: dict, *, maintenance: bool) -> str:
    """The deploy under the lock; `record` (its history) gets the release, the migrations applied, the backup."""
    progress, primary = site.progress, site.primary
    release_id = source.release_id()
    record.update(release=release_id, migrations=[], backup=None)
    release_dir = site.config.layout.releases / release_id
    previous = {m.host: m.state.current for m in site.order}
    live = primary.state.current
    serving = f"{live} keeps serving" if live else "nothing was live"

    def remove_everywhere() -> None:
        for member in site.order:
            release.remove_release(member.server, release_id)

    saved = None
    try:
        site.each_step(
            f"upload {release_id} and build its virtualenv",
            lambda m: host.upload_and_build(m, source, release_id),
        )
        against = "against the live release" if live else "(no live release to check them against)"
        with progress.step(f"check the new migrations {against}{site.on_primary()}"):
            report = SchemaReport.read(primary.server, release_dir)
            for line in schema.check_lines(report, live):
                progress.say(line)
            if report.unsafe and live and not maintenance:
                raise DeployError(schema.refuse_unsafe(report.unsafe, live))
        site.each_step("prepare", lambda m: host.prepare(m, release_id))
        if skipped := schema.backup_skipped(report, live):
            progress.say(f"   {skipped}")
        else:
            with progress.step(f"back up the database before migrating (named after {release_id}){site.on_primary()}"):
                saved = backup.take(primary.server, "deploy", release_id)
                record["backup"] = saved["name"]
                progress.say(f"   {saved['name']}: {backup.size(saved['size'])} in {saved['seconds']:.1f} s")
    except BaseException as exc:
        remove_everywhere()
        if isinstance(exc, DeployError):
            raise DeployError(f"{exc} -- stopped before the switch and before any migration; {serving}.") from exc
        raise
    windowed = maintenance and bool(report.new) and live is not None
    with site.maintenance("the schema changes") if windowed else nullcontext():
        seen: list[dict] = []
        try:
            with progress.step(f"prepare: migrate, seed_schedules{site.on_primary()}"):
                primary.server.helper(
                    release_dir, "prepare", "--stage", "migrate", what="prepare",
                    on_lines=host.report_steps(progress, seen),
                )  # fmt: skip
        except BaseException as exc:
            where = host.undo_migrations(primary, release_id, host.applied_migrations(seen), saved)
            if windowed:
                site.start_all()
            remove_everywhere()
            if isinstance(exc, DeployError):
                raise DeployError(f"{exc} -- failed at the schema step; {where}; {serving}.") from exc
            raise
        applied = host.applied_migrations(seen)
        record["migrations"] = applied
        switched: list[Member] = []

        def switch(member: Member) -> None:
            switched.append(member)
            host.activate(member, member.state, release_id, member.programs_text)

        try:
            site.in_turn(lambda m: f"switch {m.label} ({m.roles}) to {release_id}, restart, verify", switch)
        except BaseException as exc:
            _roll_back_deploy(site, release_id, exc, switched, previous, saved, applied)
    site.each_step(
        "mark the release verified; prune old releases and virtualenvs",
        lambda m: _finish(m, release_id, source.lock_hash),
    )
    return release_id


def _roll_back_deploy(
    site: Site,
    release_id: str,
    exc: BaseException,
    switched: list[Member],
    previous: dict[str, str | None],
    saved: dict | None,
    applied: list[str],
) -> None:
    """After a failed switch: undo the deploy's migrations, put each switched host back on its previous release (in
    rollout order), remove the release; raise what happened."""
    reason = str(exc) or type(exc).__name__
    if not any(previous.values()):
        raise DeployError(f"{reason} -- and there is no earlier release to roll back to.") from exc
    failed = switched[-1].label if switched else "?"
    back = ", ".join(sorted({p for p in previous.values() if p}))
    site.progress.say(f"!! {failed}: {reason}\n!! rolling back to {back}")
    where = host.undo_migrations(site.primary, release_id, applied, saved)
    problems = []
    for member in switched:
        target = previous[member.host]
        try:
            with site.progress.step(f"roll {member.label} back to {target}") if site.several else nullcontext():
                if target is None:
                    host.stop(member)
                else:
                    host.rollback_to(member, target)
        except DeployError as again:
            problems.append(f"{member.label}: {again}")
    if problems:
        raise DeployError(f"{reason} -- and rolling back failed on {'; '.join(problems)}; {where}") from exc
    for member in site.order:
        release.remove_release(member.server, release_id)
    if not isinstance(exc, DeployError):
        raise exc
    every = "every host was" if site.several else "was"
    raise DeployError(
        f"deploy of {release_id} failed on {failed} and {every} rolled back to {back}: {reason}; {where}"
    ) from exc


def _finish(member: Member, release_id: str, venv: str) -> None:
    with member.progress.step("mark the release verified; prune old releases and virtualenvs"):
        removed = release.finish(member.server, member.state, release_id, venv)
        if removed:
            member.progress.say(f"   removed {', '.join(removed)}")


def rollback(
    site: Site,
    *,
    to: str | None = None,
    unapply: bool = False,
    restore: str | None = None,
    keep_schema: bool = False,
) -> str:
    """Every host back to the previous verified release (the primary's; code, virtualenv, programs config), refused
    when the database has migrations that release lacks, unless told what to do with them: `unapply`, `restore` a
    backup, `keep_schema`."""
    if sum((unapply, bool(restore), keep_schema)) > 1:
        raise DeployError("choose one of --unapply, --restore BACKUP and --keep-schema.")
    site.require_whole("rollback")
    progress = Progress(f"rollback on {site.name}")
    site.connect_step(progress)
    layout = site.config.layout
    flags = (
        ("--unapply" if unapply else "")
        or (f"--restore {restore}" if restore else "")
        or ("--keep-schema" if keep_schema else "")
    )
    with (
        history.recorded(site, "rollback") as record,
        site.locked(f"rollback{' to ' + to if to else ''}"),
    ):
        # NOTE: the target is chosen under the lock: a deploy that finished meanwhile changed what "previous" is.
        site.read_states()
        primary = site.primary
        current = primary.state.current
        target = to or primary.state.previous()
        record.update(release=target, detail=" ".join(filter(None, [f"from {current}", flags])))
        if target is None:
            raise DeployError(f"{primary.server.name} has no verified release older than {current} to roll back to.")
        if not restore:  # a rollback --restore settles it first, as `fab restore` does
            with progress.step(f"check for an interrupted restore{site.on_primary()}"):
                backup.refuse_after_interrupted_restore(primary.server, "rollback")
        lacking = [m for m in site.order if target not in m.state.releases]
        if lacking:
            missing = [f"{m.server.name} has no release {target} ({', '.join(m.state.releases)})" for m in lacking]
            raise DeployError("; ".join(missing) + ".")
        with progress.step(f"check that {target}'s code keeps its Redis keys under the prefix{site.on_primary()}"):
            prefixed = release.uses_redis_prefix(primary.server, target)
        if not prefixed:
            raise DeployError(release.refuse_unprefixed(target))
        with progress.step(f"compare the database's migrations with {target}'s{site.on_primary()}"):
            report = SchemaReport.read(primary.server, layout.releases / target)

        def switch_all() -> None:
            site.in_turn(
                lambda m: f"switch {m.label} ({m.roles}) to {target}, restart, verify",
                lambda m: host.rollback_to(m, target),
            )

        if restore:
            found = backup.find(primary.server, restore)
            progress.say(
                f"   {current} -> {target}, the database back to {restore} (taken for {found['release']}): "
                "every write made since that backup is LOST"
            )
            what = f"{restore} (taken for {found['release']})"

            def put_back() -> str:
                return f"restored in {backup.restore(primary.server, restore)['seconds']:.1f} s (one transaction)"

            def switch_after(saved: dict) -> None:
                try:
                    switch_all()
                except DeployError as exc:
                    raise DeployError(
                        f"{exc} -- the database holds {what} now; the one it replaced is {saved['name']} "
                        f"(`fab restore {saved['name']} --yes` puts it back)."
                    ) from exc

            record["backup"] = _restore_locked(site, what, put_back, then=switch_after)
        elif report.unknown and unapply:
            current_dir = layout.releases / (current or target)
            with progress.step(f"check that {current}'s code can reverse {', '.join(report.unknown)}"):
                names = schema.unapply(primary.server, current_dir, list(report.unknown), check=True)
            with site.maintenance("migrations are unapplied"):
                with progress.step(f"unapply {', '.join(names)} with {current}'s code{site.on_primary()}"):
                    schema.unapply(primary.server, current_dir, list(report.unknown))
                record["detail"] += f" (unapplied {', '.join(names)})"
                switch_all()
        elif report.unknown and not keep_schema:
            raise DeployError(schema.refuse_rollback(target, current, report.unknown, _backup_before(primary, target)))
        else:
            if report.unknown:
                progress.say(f"   --keep-schema: {target} runs against {', '.join(report.unknown)}, which it lacks")
            progress.say(f"   {current} -> {target} (the schema is left as it is)")
            switch_all()
            if report.unknown:
                release.accept_schema(primary.server, target, report.unknown)
    progress.say(progress.summary(f"{target} is live{site.hosts_phrase()}"))
    return target


def _backup_before(primary: Member, target: str) -> str | None:
    """The backup the live release's deploy took before it migrated, else the first deploy's after `target`
    (taken while `target` was live)."""
    deploys = [r for r in backup.records(primary.server)[0] if r["kind"] == "deploy" and r["release"] > target]
    ours = [r for r in deploys if r["release"] == primary.state.current]
    chosen = ours[-1:] or deploys[:1]
    return chosen[0]["name"] if chosen else None


def _restore_locked(site: Site, what: str, put_back: Callable[[], str], then: Callable[[dict], None]) -> str:
    """Back up the database, then (the maintenance page on every web host, every program stopped) `put_back` the
    data `what` names (it returns a line on what it did, or raises having changed nothing); `then(saved)` (the backup
    just taken) brings the site back on it. The states were read under the lock. Returns the name of the backup
    taken first."""
    progress, primary = site.progress, site.primary
    with progress.step(f"back up the database it replaces{site.on_primary()}"):
        interrupted = backup.recover(primary.server)  # an earlier restore stopped halfway: settled before the dump
        if interrupted:
            progress.say(f"   NOTE: {interrupted['note']}")
        saved = backup.take(primary.server, "restore", primary.state.current)
        progress.say(f"   {saved['name']} ({backup.size(saved['size'])}, {saved['seconds']:.1f} s)")
    with site.maintenance(f"restoring {what}"):
        try:
            with progress.step(f"restore {what}"):
                progress.say(f"   {put_back()}")
        except DeployError:
            site.start_all()  # nothing was restored: the live release serves the database it had again
            raise
        then(saved)
    return saved["name"]


def _after_restore(site: Site, what: str, saved: dict) -> None:
    """The one step after any restore (a dump, or the archive): deploy/restored.py's serve_restored, the release
    whose migrations fit the restored data (the live one, the data migrated forward if need be, or the one the data
    belongs to) switched to or restarted and verified on every host; on a failure the database from before (`saved`,
    the backup taken first) is put back and the live release serves it again."""

    def put_back() -> str:
        backup.restore(site.primary.server, saved["name"])
        return f"the database is back as it was before the restore ({saved['name']})"

    serve_restored(site, what, put_back)


def _require_live(site: Site) -> None:
    """Refuse a restore while a host has no live release to bring back on the restored data."""
    idle = [m.server.name for m in site.order if not m.state.current]
    if idle:
        raise DeployError(
            f"{', '.join(idle)} {'have' if len(idle) > 1 else 'has'} no live release to restart after the "
            "restore; `fab deploy` first."
        )


@dataclass(frozen=True)
class _Restored:
    """What a restore puts back (a dump or the archive), read before anything changes."""

    label: str  # names it in the title, the lock, the history record and the summary
    what: str  # names it, with where it comes from, in the restore's steps
    refusal: str  # the refusal without --yes: what is lost
    put_back: Callable[[], str]  # under the lock, the programs stopped: a line on what it did, or raises unchanged


def _restore(site: Site, label: str, chosen: Callable[[], _Restored], *, yes: bool) -> str:
    """The one path of every restore: `chosen()` reads what is put back (refused here without `yes`); then, under the
    lock, the current state backed up, the maintenance page up and the programs stopped while it is put back, then
    the after-restore step (each host's live release, or the one the data fits, restarted and verified)."""
    site.require_whole("restore")
    progress = Progress(f"restore {label} on {site.name}")
    site.connect_step(progress)
    restored = chosen()
    if not yes:
        raise DeployError(restored.refusal)
    with history.recorded(site, "restore", detail=f"restored {label}") as entry, site.locked(f"restore {label}"):
        site.read_states()
        entry["release"] = site.primary.state.current
        _require_live(site)
        what = restored.what
        entry["backup"] = _restore_locked(
            site, what, restored.put_back, then=lambda saved: _after_restore(site, what, saved)
        )
    return progress.summary(f"{label} restored; {site.primary.state.current} serves it")


def restore(site: Site, name: str, *, yes: bool = False) -> str:
    """Put backup `name` back (the current state backed up first; the maintenance page on every web host and every
    program stopped meanwhile), then restart and verify each host's live release."""

    def chosen() -> _Restored:
        record = backup.find(site.primary.server, name)
        return _Restored(
            label=name,
            what=f"{name} (taken for {record['release']})",
            refusal=f"restoring {name} (taken for {record['release']}) replaces the whole database: every write made "
            "since is lost (the current state is backed up first); run again with --yes.",
            put_back=lambda: (
                f"restored in {backup.restore(site.primary.server, name)['seconds']:.1f} s (one transaction)"
            ),
        )

    return _restore(site, name, chosen, yes=yes)


def restore_archive(site: Site, target: datetime | None, *, yes: bool = False) -> str:
    """Put the archive's data back as it was at `target` (or at its newest archived transaction) on the db host, with
    the dump restore's safety: the time checked against the archive's window and the archive read before anything
    changes, the current state backed up, the maintenance page up and the programs stopped meanwhile, then the same
    after-restore step (restart and verify each host's live release)."""
    config = site.config
    if not config.backup_repository:
        raise DeployError(
            "backup_repository is not set in the deploy config: there is no archive to restore from (`fab backups` "
            "lists the dumps; `fab restore NAME --yes` puts one back)."
        )
    what = f"the archive at {target:%Y-%m-%d %H:%M:%S%z}" if target else "the archive's latest data"

    def chosen() -> _Restored:
        db = site.db_server()
        with site.progress.step(f"read the archive {config.backup_repository}"):
            earliest, _ = archive.check_target(archive.archive_info(db, config), target)
            site.progress.say(f"   it can restore from {earliest:%Y-%m-%d %H:%M:%S}+0000 to now")

        def put_back() -> str:
            database_url = site.primary.state.env_values(site.primary.server).get("DATABASE_URL", "")
            started = time.monotonic()
            aside = archive.restore(db, config, target)
            if database_url:
                # NOTE: the restored roles are those of the server that made the archive (on a new server, another
                # password): the role gets this site's DATABASE_URL password again.
                ensure_database(db, database_url)
            return (
                f"restored in {time.monotonic() - started:.1f} s; the data directory it replaced is kept at {aside} "
                f"on {db.name} (remove it once the site is right)"
            )

        lost = "every write after that time" if target else "every write not yet archived"
        refusal = (
            f"restoring {what} replaces the whole database: {lost} is lost (the current state is backed up first); "
            "run again with --yes."
        )
        return _Restored(label=what, what=what, refusal=refusal, put_back=put_back)

    return _restore(site, what, chosen, yes=yes)


def backup_now(site: Site, *, download: Path | None = None) -> str:
    """Take a backup on the primary (named after the live release); `download` copies it to this machine."""
    server = site.connect_primary(Progress("backup")).server
    record = backup.take(server, "manual", read_state(server).current)
    line = f"{record['name']}: {backup.size(record['size'])} in {record['seconds']:.1f} s, sha256 {record['sha256']}"
    if download:
        line += f"\ndownloaded to {backup.download(server, record, download)} (sha256 checked)"
    return line


def list_backups(site: Site) -> str:
    """The backups kept on the primary; with an archive, the archive's too (read on the db host)."""
    found, now = backup.records(site.connect_primary(Progress("backups")).server)
    text = backup.format_list(found, now)
    if site.config.backup_repository:
        lines = archive.backup_lines(site.db_server(), site.config)
        text += f"\n\narchive {site.config.backup_repository} (`fab restore --to-time/--latest`):\n" + "\n".join(
            f"  {line}" for line in lines
        )
    return text


def verify_archive(site: Site) -> str:
    """The restore test now, as its daily timer runs it: the newest backup and the WAL archived since restored into a
    scratch PostgreSQL on the db host (removed afterwards); its migrations checked against the live release's code (what
    `migrate --check` would find) and its main tables' row counts against the live ones."""
    config = site.config
    if not config.backup_repository:
        raise DeployError("backup_repository is not set in the deploy config: there is no archive to verify.")
    progress = Progress(f"verify the archive of {site.name}")
    primary = site.connect_primary(progress)
    db = site.db_server()
    with progress.step("restore the newest backup and its WAL into a scratch PostgreSQL, count, remove it"):
        result = archive.verify(db, config)
        progress.say(f"   restored and counted in {result['seconds']} s")
    state = read_state(primary.server)
    if state.current:
        with progress.step(f"migrate --check: the restored migrations against {state.current}'s"):
            report = SchemaReport.read(primary.server, config.layout.releases / state.current)
            known = (set(report.applied) - set(report.unknown)) | set(report.new)
            restored = set(result.get("migrations", []))
            unapplied, lacking = sorted(known - restored), sorted(restored - known)
            if unapplied or lacking:
                raise DeployError(
                    f"the restored copy does not fit {state.current}: "
                    + "; ".join(
                        part
                        for part in (
                            unapplied and f"unapplied migrations {', '.join(unapplied)}",
                            lacking and f"migrations the release lacks {', '.join(lacking)}",
                        )
                        if part
                    )
                )
            progress.say(f"   no unapplied migration ({len(known)} applied)")
    differ = archive.count_differences(result)
    for line in differ:
        progress.say(f"   {line}")
    counts = f"{len(result['live'])} tables' row counts match" if not differ else f"{len(differ)} table(s) differ"
    return progress.summary(f"the restore test passed: {counts}")


def plan(site: Site, repo: Path) -> str:
    """What `deploy` would do on each host, touching nothing: the release, the virtualenv, the programs config
    diff."""
    source = release.local_source(repo)
    site.connect(Progress("plan"))

    def one(member: Member) -> str:
        server = member.server
        state = read_state(server)
        state.require_provisioned(server)
        rendered = host.render(server, state)
        venv = "reused" if source.lock_hash in state.ready_venvs else "built (requirements.lock changed)"
        dirty = f" ({len(source.dirty)} uncommitted change(s) NOT shipped)" if source.dirty else ""
        new_migrations = sorted(source.migrations() - release.live_migrations(server)) if state.current else []
        lines = [
            f"deploy plan for {server.name} (environment {site.config.name}; roles {member.roles})",
            f"  ship:        HEAD {source.short}{dirty}",
            f"  live now:    {state.current or 'nothing'}",
            *(f"  commits:     {line}" for line in source.commits_since(state.current)[:20]),
            f"  virtualenv:  venvs/{source.lock_hash} {venv}",
            f"  migrations:  {', '.join(Path(m).name for m in new_migrations) or 'none new'}",
            "  prepare:     check the new migrations, check --deploy, collectstatic, "
            f"{'back up (with new migrations)' if state.current else 'no backup (no live release yet)'},"
            " migrate, seed_schedules; then switch current",
            f"  releases:    {len(state.releases)} on the server; the newest {site.config.keep_releases} are kept",
        ]
        if state.live_programs == rendered:
            lines.append("  programs:    programs.conf unchanged; rolling restart (web one at a time), worker, beat")
        else:
            lines.append("  programs:    programs.conf changes; `supervisorctl update` restarts the whole group:")
            lines.append(config_diff(state.live_programs, rendered).rstrip())
        return "\n".join(lines)

    return "\n\n".join(site.each(one))


def status(site: Site) -> str:
    """One table for the site: each host's roles, live release and programs (of the site's role); each held lock;
    then what the hosts share, read on the primary: the certificate, the backups, the releases, the schedules."""
    site.connect(Progress("status"))
    role, config = site.role, site.config

    alerts: dict[str, list[str]] = {}

    def rows(member: Member) -> tuple[list[tuple[str, ...]], dict | None]:
        server = member.server
        member.state = read_state(server)
        alerts[member.host] = notify.open_alerts(server)
        out = server.supervisorctl("status", what="supervisorctl status", warn=True).stdout
        programs = [line.split(None, 2) for line in out.splitlines() if line.strip()]
        wanted = set(member.programs.select(role).all) if role else None
        found = [p for p in programs if wanted is None or p[0] in wanted] or [["-", "no programs", ""]]
        current = member.state.current or "none"
        table = [
            (member.label, member.roles, current, p[0].split(":")[-1], p[1], p[2] if len(p) > 2 else "") for p in found
        ]
        page = maintenance_page.read_state(server) if server.config.runs("web") else None
        return table, DeployLock(server, "status").holder(), page

    table = [("HOST", "ROLES", "RELEASE", "PROGRAM", "STATE", "")]
    held, pages = [], []
    for member, (member_rows, holder, page) in zip(site.order, site.each(rows), strict=True):
        table += member_rows
        if holder:
            held.append((member, holder))
        if page is not None:
            pages.append((member, page))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 5 else cell for i, cell in enumerate(row)).rstrip() for row in table
    ]
    for name in [h for h in site.hosts if h not in site.app_hosts]:
        line = f"{address_of(name)}: {','.join(sorted(config.roles_of(name)))} (no programs)"
        upstream = []
        if name in config.role_hosts("balancer"):
            try:
                server = _root_session(site, name)
                if config.domain:
                    line += f"; {_certificate(site, name, server)}"
                upstream = read_upstream(server, address_of(name), config.role_hosts("web"))
            except DeployError as exc:
                upstream = [f"ALERT balancer {address_of(name)}: unavailable ({exc})"]
        lines += [line, *upstream]
        if role is None:
            alerts[name] = _other_host_alerts(site, name)
    for name in [*(m.host for m in site.order), *(h for h in site.hosts if h not in site.app_hosts)]:
        found = alerts.get(name)
        if not found:
            continue
        lines += [f"{address_of(name)} {found[0]}" if site.several else found[0], *found[1:]]
    releases = {row[2] for row in table[1:]}
    if len(releases) > 1:
        lines.append(f"WARNING: the hosts run different releases ({', '.join(sorted(releases))}); `fab deploy` again.")
    for member, holder in held:
        where = f" on {member.label}" if site.several else ""
        lines.append(
            f"deploy lock{where}: {holder.get('holder', '?')} ({holder.get('action', '?')}), "
            f"last step {holder['idle']} s ago"
        )
    if len({page.line() for _, page in pages}) == 1:
        lines.append(f"maintenance: {pages[0][1].line()}")
    else:
        lines += [f"maintenance on {member.label}: {page.line()}" for member, page in pages]
    lines += _updates(site)
    first = site.members.get(config.primary) or site.order[0]
    if site.several:
        lines += ["", f"on the primary, {first.label}:"]
    restoring = any(holder.get("action", "").startswith(("restore", "rollback")) for _, holder in held)
    return "\n".join([*lines, *_shared_status(site, first, restoring=restoring)])


def _shared_status(site: Site, first: Member, *, restoring: bool = False) -> list[str]:
    """`status`'s lines for what the hosts share, read on `first` (the primary): the certificate (without a
    balancer), the backups, the releases and the schedules beat runs."""
    config, server, state = site.config, first.server, first.state
    lines = []
    if config.domain and not config.role_hosts("balancer"):
        lines.append(_certificate(site, first.host))
    try:
        lines.append(backup.freshness(*backup.records(server), backup.read_timer(server)))
    except DeployError as exc:
        lines.append(f"backups: unavailable ({exc})")
    try:
        interrupted = backup.interrupted_restore(server)
        if interrupted:
            # A restore sets the schema aside while it runs too: the lock it holds (above) tells the two apart.
            running = " (unless the restore holding the deploy lock above is still running)" if restoring else ""
            lines.append(
                f"ALERT restore: {interrupted['note']}{running}; `fab deploy` and `fab rollback` refuse until it is "
                f"settled: {backup.interrupted_restore_fix(interrupted)}"
            )
    except DeployError as exc:
        lines.append(f"ALERT restore: the check for an interrupted restore failed ({exc})")
    if config.backup_repository:
        try:
            lines += archive.status_lines(site.db_server(), config)
        except DeployError as exc:
            lines.append(f"ALERT archive: unavailable ({exc})")
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


def _other_host_alerts(site: Site, name: str) -> list[str]:
    """The open watchdog alerts of a host without programs (the db host, the balancer), over a root session."""
    try:
        conn = site.by_address[address_of(name)]
        return notify.open_alerts(connect(conn, replace(site.config.for_host(name), user="root")))
    except DeployError as exc:
        return [f"alerts: unavailable ({exc})"]


def _updates(site: Site) -> list[str]:
    """`status`'s lines on OS updates: each host's pending upgrades and reboot (a host without programs over a root
    session), read in parallel."""
    config = site.config
    others = [h for h in site.hosts if h not in site.app_hosts and site.role is None]

    def one(name: str) -> str:
        try:
            member = site.members.get(name)
            server = (
                member.server
                if member
                else connect(site.by_address[address_of(name)], replace(config.for_host(name), user="root"))
            )
            line = updates.pending_line(updates.read_pending(server))
        except DeployError as exc:
            line = f"updates: unavailable ({exc})"
        return line.replace("updates:", f"updates on {address_of(name)}:", 1) if len(site.hosts) > 1 else line

    return in_parallel(one, [m.host for m in site.order] + others, name=lambda h: h)


def _root_session(site: Site, name: str):
    """The server of host `name`: its member's, else a root session (a balancer or a db host has no app user)."""
    member = site.members.get(name)
    if member:
        return member.server
    return connect(site.by_address[address_of(name)], replace(site.config.for_host(name), user="root"))


def _certificate(site: Site, name: str, server=None) -> str:
    """`status`'s certificate line, read on the host holding the certificate: the balancer (over a root session: it
    has no app user), else the one host of the site."""
    config = site.config
    try:
        server = server or _root_session(site, name)
        return tls.certificate_line(config, tls.read_certificate(server), time.time())
    except DeployError as exc:
        return f"certificate: unavailable ({exc})"


def logs(site: Site, program: str | None = None, lines: int = 100, follow: bool = False) -> str:
    """The last lines of each program's log (or of `program`, or the site's role's) on each host, each line after
    its host when there are several; `follow` keeps streaming one host's."""
    if follow and len(site.acted_on()) > 1:
        raise DeployError("--follow streams one host's logs: add -H user@host (one of the site's).")
    site.connect(Progress("logs"))
    chosen = _programs_on(site, program or site.role)
    out = []
    for member, subset in chosen:
        paths = [log_path(member.server, name) for name in subset.all]
        if follow:
            member.server.root(tail(paths, lines, follow=True), what="following logs", hide=False, pty=True, warn=True)
            return ""
        text = member.server.root(tail(paths, lines), what="reading logs", warn=True).stdout
        out.append("".join(f"{member.label} | {line}\n" for line in text.splitlines()) if site.several else text)
    return "".join(out)


def _programs_on(site: Site, program: str | None) -> list[tuple[Member, Programs]]:
    """Each connected member that runs `program` (all for None), with those programs; refused when none does."""
    chosen, refusals = [], []
    for member in site.order:
        try:
            chosen.append((member, member.programs.select(program)))
        except DeployError as exc:
            refusals.append(exc)
    if not chosen:
        raise refusals[0] if len(site.order) == 1 else DeployError(f"no host of {site.config.name} runs {program}.")
    return chosen


def restart(site: Site, program: str | None = None) -> str:
    """Restart `program` (or the site's role's programs, or all) on each host that runs it, one host at a time (web:
    one port at a time, each checked), on the live release."""
    what = program or site.role
    progress = Progress(f"restart {what or 'all programs'} on {site.name}")
    site.connect(progress)
    chosen = dict(_programs_on(site, what))
    with site.locked(f"restart {what or 'all'}"):
        site.read_states()  # under the lock: the release live now
        site.in_turn(
            lambda m: f"restart {what or 'all'} on {m.label}",
            lambda m: host.restart(m, chosen[m]),
            members=[m for m in site.order if m in chosen],
        )
    if site.several:
        return progress.summary(f"restarted on {', '.join(m.label for m in chosen)}")
    return progress.summary("restarted " + ", ".join(n.split(":")[-1] for s in chosen.values() for n in s.all))


def supervisorctl(site: Site, command: str) -> int:
    """Run `supervisorctl COMMAND` on each host against the app's supervisord; returns the last failing exit code."""
    site.connect(Progress("supervisorctl"))
    pty = command.split()[:1] == ["tail"] and "-f" in command.split()
    code = 0
    for member in site.order:
        if site.several:
            print(f"== {member.label}", flush=True)
        result = member.server.supervisorctl(
            *shlex.split(command or "status"), what="supervisorctl", warn=True, hide=False, pty=pty
        )
        code = result.exited or code
    return code


def manage(site: Site, args: str) -> int:
    """`manage.py ARGS` on the primary through root's prayer-room-manage (as the app user, in the live release,
    with the programs' environment): interactive at a terminal; returns the command's exit code."""
    argv = environment.manage_argv(site.config.layout, args)
    primary = site.connect_primary(Progress("manage", out=sys.stderr), what="manage.py runs")
    return environment.run_manage(primary.server, argv)


def env_list(site: Site) -> str:
    """Each variable the programs get on each app host, where it comes from (the env file, deploy.toml's env, derived
    from deploy.toml, a default), secrets masked; and the env file's changes not applied yet."""
    site.connect(Progress("env"))

    def one(member: Member) -> str:
        server = member.server
        state = read_state(server)
        state.require_provisioned(server)
        values = state.env_values(server)
        lines = [env_sources.format_table(env_sources.variables(server.config, values))]
        installed = server.read(server.config.layout.effective_env, what="reading the effective env file")
        if installed is None:
            lines.append("not applied yet: no effective env file (the first `fab deploy` writes it).")
        elif installed != (wanted := environment.effective_text(server, state.env_text or "")):
            pending = _pending_keys(read_env_file(installed), read_env_file(wanted))
            lines.append(
                f"not applied yet (the env file or deploy.toml changed since): {', '.join(pending) or 'comments'}; "
                "`fab deploy` or an env change applies them."
            )
        if site.several:
            lines.insert(0, f"== {member.label} ({member.roles})")
        return "\n".join(lines)

    return "\n\n".join(site.each(one))


def _pending_keys(installed: dict[str, str], wanted: dict[str, str]) -> list[str]:
    return sorted(key for key in {*installed, *wanted} if installed.get(key) != wanted.get(key))


def env_change(site: Site, sets: list[str], unsets: list[str]) -> str:
    """Set (KEY=VALUE) and unset (KEY) variables in the env file of every app host, atomically (the previous file
    kept as env.previous), then restart each host's programs the way a deploy does and verify them, in rollout order.
    Keys the kit derives are refused; a failure puts the previous env file back and restarts with it."""
    if not sets and not unsets:
        raise DeployError("name a change: fab env --set KEY=VALUE (repeatable) or --unset KEY; `fab env` lists them.")
    site.require_whole("an env change")
    for name in site.app_hosts or [None]:
        env_sources.parse_changes(site.config.for_host(name) if name else site.config, sets, unsets)
    values, keys = env_sources.parse_changes(site.config, sets, unsets)
    named = " ".join([*(f"--set {key}" for key in values), *(f"--unset {key}" for key in keys)])
    progress = Progress(f"env {named} on {site.name}")
    with progress.step("look for the site's root on each app host"):
        hosts = env_change_hosts(site.config, site.app_hosts, site.hosts_with_layout(), [*values, *keys])
    site.connect_step(progress, hosts)
    for name in site.app_hosts:
        if name not in hosts:
            progress.say(f"  {name}: not provisioned yet; `fab provision` copies these from the primary's env file")
    # NOTE: the record names the keys, never a value (it may be a secret).
    with history.recorded(site, "env", detail=named) as record, site.locked(f"env {named}"):
        with progress.step("read the env files; render the new ones"):
            site.read_states(ServerState.require_env_editable)
            record["release"] = site.primary.state.current
            texts = {}
            for member in site.order:
                old = member.state.env_text or ""
                new = edit_env_file(old, values, keys)
                if new != old:
                    environment.effective_text(member.server, new)  # a value it cannot hold is refused here
                    texts[member.host] = (old, new)
        if not texts:
            record["detail"] += " (nothing to change)"
            progress.say(progress.summary("nothing to change: the env file already says so; nothing restarted"))
            return "unchanged"
        replaced: list[Member] = []
        restarted: list[Member] = []

        def replace_file(member: Member) -> None:
            with member.progress.step("replace the env file (the one it replaces kept as env.previous)"):
                environment.install_env(member.server, *texts[member.host], effective=bool(member.state.current))
                replaced.append(member)

        def apply(member: Member) -> None:
            restarted.append(member)
            host.reload_environment(member, read_env_file(texts[member.host][1]))

        live = [m for m in site.order if m.host in texts and m.state.current]
        try:
            site.each_step("replace the env file", replace_file)
            site.in_turn(lambda m: f"restart {m.label} ({m.roles}) with the new environment, verify", apply, live)
        except BaseException as exc:
            _undo_env_change(site, [m for m in site.order if m in replaced], restarted, texts, exc)
    applied = (
        f"the programs restarted with it on {', '.join(m.label for m in live)}"
        if live
        else "no live release yet: the first deploy applies it"
    )
    progress.say(progress.summary(f"env file changed; {applied}"))
    return "changed"


def _undo_env_change(site: Site, changed: list[Member], restarted: list[Member], texts: dict, exc: BaseException):
    """After a failed env change: the previous env file back on every host whose file was replaced, the restarted
    hosts restarted with it; raise what happened."""
    reason = str(exc) or type(exc).__name__
    failed = f"on {restarted[-1].label}" if restarted else "while replacing the env files"
    site.progress.say(f"!! env change failed {failed}: {reason}\n!! putting the previous env file back")
    problems = []
    for member in changed:
        old, new = texts[member.host]
        try:
            environment.install_env(member.server, new, old, effective=bool(member.state.current))
            if member in restarted:
                member.state = read_state(member.server)
                with site.progress.step(f"restart {member.label} with the previous environment"):
                    host.reload_environment(member, read_env_file(old))
        except DeployError as again:
            problems.append(f"{member.label}: {again}")
    if problems:
        raise DeployError(
            f"{reason} -- and putting the previous env file back failed on {'; '.join(problems)}"
        ) from exc
    if not isinstance(exc, DeployError):
        raise exc
    raise DeployError(
        f"env change failed {failed}: {reason} -- the previous env file is back and the programs run with it."
    ) from exc


def unlock(site: Site) -> str:
    """Break the deploy lock a command that died left on each host (Ctrl-C, lost connection); says whose it was."""
    site.connect(Progress("unlock"))

    def one(member: Member) -> str:
        lock = DeployLock(member.server, "unlock")
        held = lock.holder()
        if held is None:
            return f"{member.server.name} is not locked."
        lock.break_lock()
        whose = f"{held.get('holder', '?')} ({held.get('action', '?')})"
        return f"{member.server.name}: removed the deploy lock of {whose}."

    return "\n".join(in_parallel(one, site.order, name=lambda m: m.host))


def provision(site: Site) -> str:
    """Prepare the site's hosts for `fab deploy` (deploy/provision.py); a re-run changes nothing and says so."""
    with history.recorded(site, "provision") as record:

        def checked(server) -> None:
            site.provisioned_primary = server

        summary = provisioning.provision(site.conns, site.config, on_primary=checked)
        record["detail"] = summary.splitlines()[-1]
    return summary


def maintenance(site: Site, state: str, message: str | None = None) -> str:
    """The operator's maintenance page `on` (with `message`) or `off` on every web host of the site: 503 with
    Retry-After for every request, kept across deploys (whose own windows leave it alone) until turned off."""
    if state not in ("on", "off"):
        raise DeployError("say `fab maintenance on [--message TEXT]` or `fab maintenance off`.")
    if state == "off" and message is not None:
        raise DeployError("--message goes with `fab maintenance on`.")
    text = maintenance_page.checked_message(message or "")
    site.require_whole(f"maintenance {state}")
    progress = Progress(f"maintenance {state} on {site.name}")
    site.connect_step(progress)
    webs = [member for member in site.order if member.server.config.runs("web")]
    if not webs:
        raise DeployError(f"{site.config.name} has no web host to show a maintenance page on.")
    with history.recorded(site, f"maintenance {state}", detail=text) as record:
        record["release"] = read_state(site.primary.server).current
        with progress.step(f"read the maintenance state{'' if len(webs) == 1 else f' of the {len(webs)} web hosts'}"):
            before = in_parallel(lambda m: maintenance_page.read_state(m.server), webs, name=lambda m: m.host)
        if state == "on":
            since = next((s.operator.get("since") for s in before if s.operator and s.operator.get("since")), None)
            page = {"since": since or record["time"], "by": record["who"], "message": text}
            with progress.step(f"put the maintenance page up on {_web_hosts(webs)}"):
                in_parallel(lambda m: maintenance_page.switch_on(m.server, page), webs, name=lambda m: m.host)
            was = " (it was on: the message is replaced)" if any(s.operator is not None for s in before) else ""
            outcome = f"maintenance is on{was}: every request gets 503 until `fab maintenance off`"
        else:
            with progress.step(f"take the maintenance page down on {_web_hosts(webs)}"):
                in_parallel(lambda m: maintenance_page.switch_off(m.server), webs, name=lambda m: m.host)
            was = "" if any(s.operator is not None for s in before) else " (it was not on)"
            still = [m.label for m, s in zip(webs, before, strict=True) if s.window]
            outcome = f"maintenance is off{was}" + (
                f"; a deploy's own window keeps {', '.join(still)} answering 503 until it ends" if still else ""
            )
    return progress.summary(outcome)


def _web_hosts(webs: list[Member]) -> str:
    return webs[0].label if len(webs) == 1 else f"the {len(webs)} web hosts"


def show_history(site: Site, lines: int = 50) -> str:
    """The site's last `lines` provisions, deploys, rollbacks, restores, env changes and maintenance switches, kept
    on the primary: when, what, result, duration, who."""
    if lines < 1:
        raise DeployError("--lines takes a positive number of records.")
    server = site.connect_primary(Progress("history", out=sys.stderr)).server
    return history.format_table(history.read(server, lines))
