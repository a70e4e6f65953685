"""Restored data made to serve: the release whose migrations fit it chosen, the data migrated forward when that
release adds to it, every host switched (or restarted), verified and writable; or the data from before put back.

`serve_restored` is the one step after any restore (a pg_dump backup, a point in time of the archive)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from deploy import host, release, schema
from deploy.errors import DeployError
from deploy.site import Site
from deploy.state import read_state


def serve_restored(site: Site, restored: str, put_back: Callable[[], str]) -> str:
    """After `restored` (e.g. "backup NAME") replaced the database, with every program stopped, the states read
    under the lock: pick the release that fits the data (deploy/schema.py's choose_release, printed), migrate the
    data forward when it needs to (in one transaction), switch or restart every host on it and verify it (writes
    included). Returns the release now serving.

    On any failure, `put_back()` puts the data from before the restore back (it returns what it did, in a
    sentence), the release that was live serves it again on every host, and a DeployError says what happened and
    the way back."""
    progress, primary = site.progress, site.primary
    live = primary.state.current
    if live is None:
        raise DeployError(f"{primary.server.name} has no live release to serve {restored}; `fab deploy` first.")
    layout = site.config.layout
    reports: dict[str, schema.SchemaReport] = {}

    def report_of(name: str) -> schema.SchemaReport:
        if name not in reports:
            with progress.step(f"read {name}'s migrations against the restored data{site.on_primary()}"):
                reports[name] = schema.SchemaReport.read(primary.server, layout.releases / name)
        return reports[name]

    # Verified releases first (newest first), then those rolled back from: a release is never a restore's choice
    # over one the operator did not roll away from.
    on_all = set.intersection(*(set(m.state.releases) for m in site.order)) - {live}
    verified = primary.state.deployed
    others = sorted(on_all, key=lambda r: (r in verified, r), reverse=True)
    kept: dict[str, set[str]] = {}

    def accepted(name: str) -> set[str]:
        if name not in kept:
            kept[name] = release.accepted_schema(primary.server, name)
        return kept[name]

    switched: list = []
    try:
        fit = schema.choose_release(live, others, report_of, accepted=accepted)
        progress.say(f"   chosen: {fit.reason}")
        if fit.migrate:
            try:
                _migrate_forward(site, fit)
            except DeployError as exc:
                if fit.release != live:
                    raise
                fit = schema.choose_release(live, others, report_of, refused=str(exc), accepted=accepted)
                progress.say(f"   chosen: {fit.reason}")
                if fit.migrate:
                    _migrate_forward(site, fit)
        if fit.release == live:
            site.in_turn(lambda m: f"restart and verify {m.label} ({m.roles}) on {live}", host.reactivate)
        else:

            def switch(member) -> None:
                switched.append(member)
                host.rollback_to(member, fit.release)

            site.in_turn(lambda m: f"switch {m.label} ({m.roles}) to {fit.release}, restart, verify", switch)
    except DeployError as exc:
        progress.say(f"!! {exc}\n!! putting the data from before the restore back; {live} serves it again")
        raise DeployError(f"{exc} -- {_back(site, live, switched, put_back)}") from exc
    for member in site.order:
        member.state = replace(member.state, current=fit.release)
    return fit.release


def _migrate_forward(site: Site, fit: schema.Fit) -> None:
    progress, primary = site.progress, site.primary
    release_dir = site.config.layout.releases / fit.release
    with progress.step(f"migrate the restored data forward with {fit.release} (one transaction){site.on_primary()}"):
        line = primary.server.helper(release_dir, "migrate-forward", what="migrating forward", timeout=3600)[-1]
        progress.say(f"   applied {', '.join(line['applied']) or 'nothing'} in {line['seconds']:.1f} s")


def _back(site: Site, live: str, switched: list, put_back: Callable[[], str]) -> str:
    """The data from before the restore put back and `live` serving it on every host; what was done, in words."""
    progress = site.progress
    for member in site.order:  # nothing writes while the data is replaced again
        member.server.supervisorctl("stop", *member.programs.all, what="stopping the programs", warn=True)
    try:
        with progress.step("put the data from before the restore back"):
            done = put_back()
    except DeployError as exc:
        return f"and putting the data from before the restore back failed too ({exc}); the site stays stopped"
    problems = []
    for member in site.order:
        try:
            with progress.step(f"restart and verify {member.label} on {live}"):
                if member in switched:
                    host.return_to(member, live)
                else:
                    member.state = read_state(member.server)
                    host.reactivate(member)
        except DeployError as again:
            problems.append(f"{member.label}: {again}")
    if problems:
        return f"{done}; but {live} did not come back on {'; '.join(problems)}"
    return f"{done}; {live} serves it again, verified"
