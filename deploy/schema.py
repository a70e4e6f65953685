"""The database schema against a release: applied vs known migrations, unsafe new ones, undoing them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace

from deploy.errors import DeployError
from deploy.ssh import Server


@dataclass(frozen=True)
class SchemaReport:
    """What one release's code says about the database (from `app_helper.py migrations` run in that release)."""

    applied: tuple[str, ...]
    unknown: tuple[str, ...]  # applied in the database, absent from the release's code
    new: tuple[str, ...]  # in the release's code, not applied yet (in the order migrate applies them)
    unsafe: tuple[dict, ...]  # operations of `new` the running release cannot live with
    operations: dict[str, list[str]] = field(default_factory=dict)  # each of `new`: its operations' kinds

    @classmethod
    def read(cls, server: Server, release_dir) -> SchemaReport:
        line = server.helper(release_dir, "migrations", what="reading the migrations", timeout=300)[-1]
        return cls(
            tuple(line["applied"]),
            tuple(line["unknown"]),
            tuple(line["new"]),
            tuple(line.get("unsafe", ())),
            dict(line.get("operations", {})),
        )

    @property
    def exact(self) -> bool:
        """The database has exactly this release's migrations: the data belongs to it."""
        return not self.unknown and not self.new

    def not_additions(self) -> list[str]:
        """Each operation of `new` that is not a forward-only addition ("app.0007_x: RunSQL"), in order."""
        return [
            f"{name}: {kind}" for name in self.new for kind in self.operations.get(name, ["?"]) if kind not in ADDITIONS
        ]


# Operations that only add to a schema (a table, a column, an index, a constraint) or change no table: restored data
# goes through them unchanged (a constraint the data breaks fails the migration, which then changes nothing).
ADDITIONS = frozenset(
    {"CreateModel", "AddField", "AddIndex", "AddConstraint", "AlterModelOptions", "AlterModelManagers"}
)


@dataclass(frozen=True)
class Fit:
    """The release that serves restored data: `migrate` (this release's migrations the data lacks) applied first."""

    release: str
    migrate: tuple[str, ...]
    reason: str  # what was chosen and why, for the operator


def choose_release(
    live: str,
    others: Iterable[str],
    report_of: Callable[[str], SchemaReport],
    refused: str | None = None,
    accepted: Callable[[str], Collection[str]] = lambda release: (),
) -> Fit:
    """The release whose migrations fit restored data, decided on the data's django_migrations rows against each
    release's migration graph (`report_of(release)`, read lazily): the live release when it has exactly the data's
    migrations, or when the ones it adds are forward-only additions (migrated forward) -- unless `refused` says that
    migration failed; else the first of `others` (in the order given: the caller's preference) with exactly the
    data's migrations (the release the data belongs to); else the first of `others` that adds only forward-only
    additions. None fits: DeployError. A release lacking only migrations `accepted(release)` names (those
    `rollback --keep-schema` let it run against) counts as having them."""

    def fitted(release: str) -> tuple[SchemaReport, bool]:
        report = report_of(release)
        if report.unknown and set(report.unknown) <= set(accepted(release)):
            return replace(report, unknown=()), True
        return report, False

    report, kept = fitted(live)
    if report.exact:
        if kept:
            return Fit(live, (), f"{live} (live) lacks only migrations `rollback --keep-schema` let it run against: it "
                                 "serves the restored data as it is")  # fmt: skip
        return Fit(live, (), f"{live} (live) has exactly the restored data's migrations: it serves them as they are")
    if report.unknown:
        why = f"the data has {len(report.unknown)} migration(s) {live} (live) lacks ({', '.join(report.unknown)})"
    elif refused:
        why = f"migrating the data forward with {live} (live) failed and changed nothing ({refused})"
    elif report.not_additions():
        why = f"{live} (live) would migrate the data with more than additions ({'; '.join(report.not_additions())})"
    else:
        return Fit(
            live,
            report.new,
            f"{live} (live) adds {len(report.new)} migration(s) to the restored data, each a forward-only addition "
            f"({', '.join(report.new)}): the data is migrated forward with it",
        )
    others = [release for release in dict.fromkeys(others) if release != live]
    forward = []
    for release in others:
        other, kept = fitted(release)
        if other.exact:
            also = ", with those `rollback --keep-schema` let it run against" if kept else ""
            return Fit(
                release, (), f"{why}; the data belongs to {release} (exactly its migrations{also}): switching to it"
            )
        if not other.unknown and not other.not_additions():
            forward.append((release, other))
    if forward:
        release, other = forward[0]
        return Fit(
            release,
            other.new,
            f"{why}; no release has exactly the data's migrations; {release} adds only forward-only additions "
            f"({', '.join(other.new)}): switching to it, the data migrated forward",
        )
    tried = ", ".join(others) or "no other release is on every host"
    raise DeployError(f"no release fits the restored data: {why}; and none of the others ({tried}) has its migrations")


def check_lines(report: SchemaReport, live: str | None) -> list[str]:
    """The deploy's lines on the new migrations: their names, then each one the live release cannot run against; with
    no live release, nothing runs on the old schema, so none is unsafe and none is flagged."""
    lines = [f"   new migrations: {', '.join(report.new) or 'none'}"]
    if live:
        lines += [f"   UNSAFE {item['migration']}: {item['problem']}" for item in report.unsafe]
    return lines


def backup_skipped(report: SchemaReport, live: str | None) -> str | None:
    """Why a deploy takes no backup before `migrate`, or None when it takes one: new migrations onto the database a
    live release serves. With no live release, no release has written to the database: there is nothing to back up."""
    if not live:
        return "no backup: no live release yet (no release has written to the database)"
    if not report.new:
        return "no backup: no new migrations (migrate changes nothing)"
    return None


def refuse_unsafe(unsafe: tuple[dict, ...], live: str | None) -> str:
    """The message of a deploy refused for migrations the live release cannot run against."""
    lines = [
        f"the new migrations would break {live or 'the live release'} while it still serves (during the rolling "
        "restart, and after any rollback):"
    ]
    for item in unsafe:
        lines.append(f"  {item['migration']}: {item['operation']}: {item['problem']}; fix: {item['fix']}.")
    lines.append(
        "Make the migration compatible, or deploy it with --maintenance (the site answers 503 while web stops, "
        "the migrations run and web starts again)."
    )
    return "\n".join(lines)


def refuse_rollback(target: str, current: str | None, unknown: tuple[str, ...], backup: str | None) -> str:
    """The message of a rollback refused because the database has migrations the target release lacks."""
    choice = f"--restore {backup}" if backup else "--restore BACKUP"
    return "\n".join(
        [
            f"the database has {len(unknown)} migration(s) that {target} does not have: {', '.join(unknown)}.",
            f"{target}'s code may fail against this schema (a NOT NULL column it does not fill, a table it lacks).",
            "Choose one:",
            f"  --unapply      migrate them back with {current or 'the newer release'}'s code first (when reversible);",
            f"  {choice:14} put back the backup taken before that deploy: writes made since then are LOST;",
            "  --keep-schema  switch anyway and leave the schema as it is (only if the code can live with it).",
        ]
    )


def unapply(server: Server, release_dir, names: list[str], *, check: bool = False) -> list[str]:
    """Unapply `names` (app.migration) with the code of `release_dir`; with `check`, only test they can be reversed.

    Returns the migrations (to be) unapplied, dependants included, newest first.
    """
    args = ["unapply", *(["--check"] if check else []), *names]
    line = server.helper(release_dir, *args, what="unapplying migrations", timeout=1800)[-1]
    return line.get("unapply") or line.get("unapplied") or []


def require_known(unknown: tuple[str, ...], release: str) -> None:
    if unknown:
        raise DeployError(f"the database has migrations {release} does not have: {', '.join(unknown)}.")
