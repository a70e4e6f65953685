"""The database schema against a release: applied vs known migrations, unsafe new ones, undoing them."""

from __future__ import annotations

from dataclasses import dataclass

from deploy.errors import DeployError
from deploy.ssh import Server


@dataclass(frozen=True)
class SchemaReport:
    """What one release's code says about the database (from `app_helper.py migrations` run in that release)."""

    applied: tuple[str, ...]
    unknown: tuple[str, ...]  # applied in the database, absent from the release's code
    new: tuple[str, ...]  # in the release's code, not applied yet (in the order migrate applies them)
    unsafe: tuple[dict, ...]  # operations of `new` the running release cannot live with

    @classmethod
    def read(cls, server: Server, release_dir) -> SchemaReport:
        line = server.helper(release_dir, "migrations", what="reading the migrations", timeout=300)[-1]
        return cls(tuple(line["applied"]), tuple(line["unknown"]), tuple(line["new"]), tuple(line.get("unsafe", ())))


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
