"""`fab os-update --release`: a provisioned, deployed Debian 12 (bookworm) server upgraded to Debian 13 (trixie)
without losing data.

One path, under the deploy lock: read the server and refuse (one line, nothing changed) what it cannot upgrade; a
backup (deploy/backup.py's pg_dump); apt's sources moved to the new release's suites (same mirrors) and every package
downloaded while the site still serves; then the maintenance page, the programs stopped (the worker's warm
shutdown), the rows counted, `apt-get full-upgrade` keeping the kit's config files, PostgreSQL's cluster moved to the
new major version with pg_upgradecluster (the old one dropped only once the new one holds the same rows), a reboot,
provision's steps again (they render from facts read on the new release), the live release's virtualenv rebuilt for
the new Python, its programs restarted and verified, a request through nginx; the page off; recorded in the history.

A site of one host only: a cluster is upgraded host by host (docs/release-upgrade.md).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from deploy import backup, history, host, maintenance
from deploy import provision as provisioning
from deploy.commands import release_upgrade as commands
from deploy.commands.release_upgrade import Cluster, Facts
from deploy.errors import DeployError
from deploy.os_update import BOOT_TIMEOUT, Target, _reboot, _wait_services
from deploy.progress import Progress
from deploy.release import build_venv
from deploy.site import Site
from deploy.ssh import Server
from deploy.state import read_state
from deploy.verify import _get_over_ssh, health_host

# What the upgrade needs free under /var: the packages downloaded and unpacked, and the new cluster beside the old.
MIN_FREE_KB = 2 * 1024 * 1024
# What the site is told to expect: the window measured on the kit's test server, rounded up
# (docs/release-upgrade.md).
EXPECTED_DOWNTIME = "2 to 5 minutes on a small server (longer on a slow disk, a slow mirror or with a large database)"


def check(facts: Facts, where: str) -> tuple[str, str, Cluster]:
    """The upgrade `facts` allow: (the release, the one after it, the PostgreSQL cluster to move); otherwise a
    refusal naming what to do."""
    if facts.codename not in commands.NEXT_RELEASE:
        if facts.codename == "trixie":
            raise DeployError(
                f"{where} already runs Debian 13 (trixie), the newest release os-update --release knows: "
                "`fab os-update` keeps it updated."
            )
        raise DeployError(
            f"{where} runs {facts.codename or 'an unknown release'} (VERSION_ID {facts.version or '?'}), not Debian 12 "
            "(bookworm): os-update --release upgrades Debian 12 to 13 only; nothing was changed."
        )
    new, _ = commands.NEXT_RELEASE[facts.codename]
    online = [c for c in facts.clusters if c.status == "online"]
    if len(online) != 1 or len(facts.clusters) != 1:
        listed = ", ".join(f"{c.label} ({c.status}, port {c.port})" for c in facts.clusters) or "none"
        raise DeployError(
            f"{where} has PostgreSQL clusters {listed}: os-update --release moves the one cluster provision made, "
            "which must be online; nothing was changed."
        )
    if facts.free_kb < MIN_FREE_KB:
        raise DeployError(
            f"{where} has {facts.free_kb // 1024} MB free under /var; the upgrade needs {MIN_FREE_KB // 1024} MB "
            "(packages, the new PostgreSQL cluster beside the old): free some; nothing was changed."
        )
    return facts.codename, new, online[0]


def announce(where: str, old: str, new: str, cluster: Cluster) -> str:
    """The line said before anything starts: what will happen and the downtime."""
    return (
        f"os-update --release: {where} from Debian {commands.VERSIONS[old]} ({old}) to Debian "
        f"{commands.VERSIONS[new]} ({new}): a backup, the packages downloaded while the site serves, then the "
        f"maintenance page, the programs stopped, the upgrade, PostgreSQL {cluster.version} moved to the new "
        "release's version, a reboot, provision again, the virtualenv rebuilt, the site verified. Expected downtime "
        f"(503 page): {EXPECTED_DOWNTIME}."
    )


def release_upgrade(
    site: Site,
    *,
    yes: bool = False,
    confirm: Callable[[str], bool] | None = None,
    boot_timeout: int = BOOT_TIMEOUT,
) -> str:
    """Upgrade the site's one server to the next Debian release (see the module's docstring); `yes`, or `confirm`
    (a terminal's answer), before anything changes."""
    config = site.config
    if config.multi_host or len(site.hosts) != 1:
        raise DeployError(
            "os-update --release upgrades a site of one host; on a cluster, upgrade host by host as "
            "docs/release-upgrade.md says (the db host's PostgreSQL last)."
        )
    if config.backup_repository:
        raise DeployError(
            "backup_repository is set: the archive's stanza belongs to the PostgreSQL version it was made for, and "
            "os-update --release does not move it; upgrade as docs/release-upgrade.md says (pgbackrest stanza-upgrade)."
        )
    site.require_whole("os-update --release")
    progress = Progress(f"os-update --release on {site.name}")
    site.connect_step(progress)
    member = site.primary
    server = member.server
    with progress.step("read the release, apt's sources, PostgreSQL's clusters"):
        facts = commands.parse_facts(server.root(commands.FACTS, what="reading the release").stdout)
        old, new, cluster = check(facts, server.name)
        sources = _read_sources(server, facts)
        changed = {path: commands.switch_sources(text, old, new) for path, text in sources.items()}
        changed = {path: text for path, text in changed.items() if text != sources[path]}
        named = [suite for text in sources.values() for _, suite in commands.repositories(text)]
        if not changed and not any(suite.startswith(new) for suite in named):
            raise DeployError(
                f"apt's sources on {server.name} name no {old} suite ({', '.join(sources) or 'no sources'}): the "
                f"target release's mirror is unknown; nothing was changed."
            )
        _probe(server, changed or sources, new)
    progress.say(announce(server.name, old, new, cluster))
    if not yes and not (confirm and confirm("upgrade now?")):
        raise DeployError(
            f"upgrading {server.name} to Debian {commands.VERSIONS[new]} takes the site down ({EXPECTED_DOWNTIME}); "
            "run again with --yes."
        )
    detail = f"Debian {commands.VERSIONS[old]} ({old}) -> {commands.VERSIONS[new]} ({new})"
    with history.recorded(site, "os-update --release", detail=detail) as record, site.locked("os-update --release"):
        site.read_states()
        state = member.state
        record["release"] = state.current
        if not state.current:
            raise DeployError(
                f"{server.name} has no live release to bring back after the upgrade: `fab deploy` first (or provision "
                "a fresh Debian 13 server: nothing is lost on one that serves nothing); nothing was changed."
            )
        with progress.step("back up the database (pg_dump)"):
            try:
                saved = backup.take(server, "upgrade", state.current)
            except DeployError as exc:
                raise DeployError(f"no fresh backup could be taken, so nothing was changed: {exc}") from exc
            record["backup"] = saved["name"]
            progress.say(f"   {saved['name']} ({backup.size(saved['size'])}, {saved['seconds']:.1f} s)")
        _switch_sources(site, server, sources, changed, new)
        record["detail"] += _upgrade(site, cluster, saved["name"], boot_timeout)
    return progress.summary(f"{server.name} runs Debian {commands.VERSIONS[new]} ({new}); {state.current} serves it")


def _read_sources(server: Server, facts: Facts) -> dict[str, str]:
    texts = {}
    for path in facts.sources:
        text = server.read(path, what=f"reading {path}")
        if text is not None:
            texts[path] = text
    return texts


def _probe(server: Server, changed: dict[str, str], new: str) -> None:
    """Every mirror the new sources name has the new release's suites (its dists/SUITE/Release); else refuse."""
    pairs = [pair for text in changed.values() for pair in commands.repositories(text)]
    urls = commands.probe_urls([(uri, suite) for uri, suite in pairs if suite.startswith(new)])
    if not urls:
        return
    answer = server.root(commands.PROBE, what="asking the mirrors for the new release", in_stream=io.StringIO(
        "\n".join(urls) + "\n"), timeout=180).stdout  # fmt: skip
    missing = [line.split(None, 1) for line in answer.splitlines() if line.split(None, 1)[:1] != ["200"]]
    if missing or len(answer.splitlines()) < len(urls):
        said = ", ".join(f"{url} ({'HTTP ' + status if status != '0' else 'no answer'})" for status, url in missing)
        raise DeployError(
            f"the target release {new} is unknown to {server.name}'s mirrors: {said or 'no answer'} has no "
            "Release file; nothing was changed."
        )


def _switch_sources(site: Site, server: Server, sources: dict[str, str], changed: dict[str, str], new: str) -> None:
    """Keep the sources as they are, write the new release's, fetch its lists and download every package; on a
    failure the old sources come back (no package changed yet)."""
    progress = site.progress
    files = ", ".join(changed) or "already switched by an earlier attempt"
    with progress.step(f"apt's sources to {new} ({files}), the packages downloaded (the site serves)"):
        if changed:  # an earlier attempt's switch keeps the copies it made of the sources as they were
            server.root(commands.keep_sources(list(sources)), what="keeping apt's sources")
        try:
            if changed:
                server.upload(
                    [(text, path, "root", "0644") for path, text in changed.items()], what="writing apt's sources"
                )
            out = server.root(commands.download(), what="downloading the new release's packages", timeout=3600).stdout
        except DeployError as exc:
            kept = list(changed) or list(sources)
            server.root(commands.put_sources_back(kept), what="putting apt's sources back", warn=True)
            raise DeployError(f"{exc} -- apt's sources are back as they were; no package was changed") from exc
        upgraded, installed, removed = commands.parse_upgrade_counts(out)
        progress.say(f"   {upgraded} to upgrade, {installed} new, {removed} to remove (downloaded)")
        if removed:
            progress.say(f"   to remove: {' '.join(commands.removed_packages(out))}")


def _upgrade(site: Site, cluster: Cluster, saved: str, boot_timeout: int) -> str:
    """Behind the maintenance page: the upgrade, PostgreSQL, the reboot, provision, the virtualenv, the checks. The
    page stays up on a failure (the error says so). Returns what the history's record adds."""
    progress, member = site.progress, site.primary
    server = member.server
    with progress.step("maintenance page on"):
        maintenance.turn_on(server)
    started = time.monotonic()
    flag = server.config.layout.maintenance_flag
    try:
        host.stop(member)
        database = _database(member)
        with progress.step(f"count the rows of {database} in PostgreSQL {cluster.version}"):
            before = _counts(server, cluster, database)
            progress.say(f"   {len(before)} tables, {sum(before.values())} rows")
        with progress.step("apt-get full-upgrade (the kit's config files kept)"):
            out = server.root(commands.full_upgrade(), what="upgrading (apt-get full-upgrade)", timeout=5400).stdout
            upgraded, installed, removed = commands.parse_upgrade_counts(out)
            progress.say(f"   {upgraded} upgraded, {installed} new, {removed} removed")
        version = _move_cluster(site, cluster, database, before)
        with site.offline(server):
            _reboot(site, Target(member.host, server, member), boot_timeout)
        with progress.step("wait for PostgreSQL, Redis and nginx"):
            _wait_services(server, ("postgresql", "redis-server", "nginx"))
        with progress.step("provision again: its steps for the new release"):
            progress.say(provisioning.provision(site.conns, site.config, lock_held=True))
        member.state = read_state(server)
        _rebuild(member)
        _check_nginx(member, on_page=True)
    except BaseException as exc:
        raise DeployError(
            f"{str(exc) or type(exc).__name__} -- the maintenance page stays on ({flag}: remove it once the site is "
            f"right); the backup taken first is {saved} (docs/release-upgrade.md: the way back)"
        ) from exc
    maintenance.turn_off(server)
    window = time.monotonic() - started
    progress.record("maintenance window (the site answered 503, or nothing while it rebooted)", window)
    _check_nginx(member, on_page=False)
    return f"; PostgreSQL {cluster.version} -> {version}; maintenance page {window:.0f} s"


def _database(member) -> str:
    url = urlsplit(member.state.env_values(member.server).get("DATABASE_URL", ""))
    return url.path.lstrip("/") or "prayer_room"


def _counts(server: Server, cluster: Cluster, database: str) -> dict[str, int]:
    out = server.root(commands.row_counts(cluster, database), what=f"counting the rows in {cluster.label}").stdout
    return commands.parse_row_counts(out)


def _clusters(server: Server) -> list[Cluster]:
    return list(commands.parse_facts(server.root(commands.FACTS, what="listing the clusters").stdout).clusters)


def _move_cluster(site: Site, cluster: Cluster, database: str, before: dict[str, int]) -> str:
    """The cluster moved to the newest PostgreSQL installed: the empty cluster its package made dropped, the old one
    upgraded into a new one (pg_upgradecluster), the rows compared, then the old cluster and its server dropped."""
    progress, server = site.progress, site.primary.server
    installed = server.root("ls /usr/lib/postgresql", what="listing PostgreSQL's versions").stdout.split()
    version = max((v for v in installed if v.isdigit()), key=int, default=cluster.version)
    if version == cluster.version:
        raise DeployError(f"the upgrade installed no PostgreSQL newer than {cluster.version} (postgresql's package?)")
    with progress.step(f"PostgreSQL {cluster.version} -> {version} (pg_upgradecluster)"):
        for other in _clusters(server):
            if other.version == version:
                names = set(server.root(commands.databases(other), what="reading the new cluster").stdout.split())
                if names - commands.EMPTY_CLUSTER_DATABASES:
                    raise DeployError(
                        f"a PostgreSQL {other.label} cluster with databases {', '.join(sorted(names))} is in the way"
                    )
                server.root(commands.drop_cluster(other), what=f"dropping the empty cluster {other.label}")
        server.root(commands.upgrade_cluster(cluster, version), what="pg_upgradecluster", timeout=7200)
        moved = next((c for c in _clusters(server) if c.version == version and c.name == cluster.name), None)
        if moved is None or moved.status != "online" or moved.port != cluster.port:
            raise DeployError(
                f"after pg_upgradecluster, {version}/{cluster.name} is {moved and moved.status} on port "
                f"{moved and moved.port}, not online on {cluster.port}; {cluster.label} is kept"
            )
        after = _counts(server, moved, database)
        if after != before:
            differ = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
            raise DeployError(
                f"PostgreSQL {version} holds other row counts than {cluster.version} ({', '.join(differ[:5])}); "
                f"{cluster.label} is kept"
            )
        progress.say(f"   {len(after)} tables, {sum(after.values())} rows: the same in {version}")
        settings = server.root(commands.access_settings(cluster, moved), what="comparing the clusters' settings")
        lost = commands.parse_lost_settings(settings.stdout)
        if lost:
            raise DeployError(
                f"PostgreSQL {version} lacks what {cluster.label} had (pg_hba.conf, conf.d): {'; '.join(lost[:3])}; "
                f"{cluster.label} is kept"
            )
        server.root(commands.drop_cluster(cluster), what=f"dropping {cluster.label}")
        server.root(
            commands.remove_packages([f"postgresql-{cluster.version}", f"postgresql-client-{cluster.version}"]),
            what=f"removing PostgreSQL {cluster.version}",
            timeout=900,
        )
    return version


def _rebuild(member) -> None:
    """The live release's virtualenv rebuilt with the new release's Python (the old one's is gone), its programs
    restarted the way a restore's are, and verified (health, a worker's task, beat, a write)."""
    server, state = member.server, member.state
    layout = server.config.layout
    venv = state.venvs.get(state.current)
    if not venv:
        raise DeployError(f"{state.current} on {server.name} links no virtualenv")
    host.stop(member)
    with member.progress.step(f"rebuild venvs/{venv} with the new release's Python"):
        build_venv(server, layout.releases / state.current / "requirements.lock", venv)
    host.reactivate(member)


def _check_nginx(member, *, on_page: bool) -> None:
    """/health/ through nginx on port 80: the maintenance page (503) while it is up, then the site (200; a redirect
    to HTTPS with a domain)."""
    server = member.server
    wanted = {503} if on_page else ({301, 308} if server.config.domain else {200})
    name = "the maintenance page" if on_page else "the site"
    with member.progress.step(f"nginx serves {name} ({' or '.join(map(str, sorted(wanted)))} on /health/)"):
        status, body = _get_over_ssh(server, 80, health_host(member.state.env_values(server)))
        if status not in wanted:
            raise DeployError(f"nginx answered {status} on /health/, not {' or '.join(map(str, wanted))}: {body[:200]}")
