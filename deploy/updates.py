"""What `fab status` says about each host's OS updates: the upgrades waiting (security ones among them), how fresh
apt's lists are, when unattended-upgrade last ran, and a pending reboot."""

from __future__ import annotations

import time
from dataclasses import dataclass

from deploy.commands import updates as commands
from deploy.ssh import Server


@dataclass(frozen=True)
class Pending:
    """A host's waiting upgrades (security ones among them), its package lists' and unattended-upgrade's last run,
    and a pending reboot (since when, asked by which packages)."""

    now: int
    upgrades: tuple[str, ...]
    security: tuple[str, ...]
    lists_updated: int | None
    unattended_ran: int | None
    reboot_since: int | None
    reboot_packages: tuple[str, ...]


def parse_pending(text: str) -> Pending:
    """commands.PENDING's output."""
    facts = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("inst "))
    installs = [line.split()[1:] for line in text.splitlines() if line.startswith("inst ") and len(line.split()) > 1]

    def stamp(key: str) -> int | None:
        value = facts.get(key, "")
        return int(value) if value.isdigit() else None

    return Pending(
        now=stamp("now") or int(time.time()),
        upgrades=tuple(words[0] for words in installs),
        security=tuple(words[0] for words in installs if "-security" in " ".join(words[1:]).lower()),
        lists_updated=stamp("lists"),
        unattended_ran=stamp("unattended"),
        reboot_since=stamp("reboot"),
        reboot_packages=tuple(facts.get("reboot_packages", "").split()),
    )


def _ago(now: int, then: int | None) -> str:
    if then is None:
        return "never"
    hours = max(0, now - then) / 3600
    return f"{hours:.0f} h ago" if hours < 48 else f"{hours / 24:.0f} days ago"


def pending_line(pending: Pending) -> str:
    """`fab status`'s line for one host."""
    count = len(pending.upgrades)
    line = f"updates: {count} pending ({len(pending.security)} security)" if count else "updates: none pending"
    line += (
        f"; package lists fetched {_ago(pending.now, pending.lists_updated)}, "
        f"unattended-upgrade ran {_ago(pending.now, pending.unattended_ran)}"
    )
    if pending.reboot_since is not None:
        packages = f" by {', '.join(pending.reboot_packages)}" if pending.reboot_packages else ""
        line += (
            f"  WARNING: a reboot is pending since {_ago(pending.now, pending.reboot_since)}{packages}: "
            "`fab os-update` reboots it"
        )
    return line


def read_pending(server: Server) -> Pending:
    return parse_pending(server.root(commands.PENDING, what="reading pending updates", timeout=120).stdout)
