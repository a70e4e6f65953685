"""Every systemd unit the kit installs, by its template, and for each service the highest exposure `systemd-analyze
security` may rate it on a provisioned test server of each Debian release, with the end-to-end module that measures
it there. tests/deploy/test_units.py fails when a template under deploy/templates/provision is not named here.

The bounds are the figures measured (2026-12-05; docs/security.md): a unit that loses a protection fails its test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "templates" / "provision"
# The releases the end-to-end layers boot (tests/support/nspawn.py RELEASES) by /etc/debian_version's major number.
DEBIAN = {"13": "trixie", "12": "bookworm"}


@dataclass(frozen=True)
class Service:
    template: str
    unit: str
    module: str  # the end-to-end module (tests/deploy) that measures it on a provisioned server
    bound: dict[str, float]  # release (trixie, bookworm) -> the highest exposure allowed there


SERVICES = (
    Service("app.service.j2", "prayer-room.service", "test_security_e2e", {"trixie": 2.2, "bookworm": 2.2}),
    Service("backup.service.j2", "prayer-room-backup.service", "test_security_e2e", {"trixie": 1.6, "bookworm": 1.6}),
    Service(
        "watchdog.service.j2", "prayer-room-watchdog.service", "test_security_e2e", {"trixie": 1.6, "bookworm": 1.6}
    ),
    Service("egress.service.j2", "prayer-room-egress.service", "test_security_e2e", {"trixie": 2.7, "bookworm": 2.7}),
    # A cluster's db host (tests/support/cluster.py boots Debian 13 only).
    Service("firewall.service.j2", "prayer-room-firewall.service", "test_cluster_e2e", {"trixie": 2.7}),
    # With backup_repository (the archive test boots Debian 13 only).
    Service("archive-backup.service.j2", "prayer-room-archive-full.service", "test_archive_e2e", {"trixie": 1.3}),
    Service("archive-backup.service.j2", "prayer-room-archive-diff.service", "test_archive_e2e", {"trixie": 1.3}),
    Service("archive-verify.service.j2", "prayer-room-archive-verify.service", "test_archive_e2e", {"trixie": 1.5}),
)

# Drop-ins for Debian's own units (not the kit's, so not bounded here): they add an ordering and a start condition,
# or one environment variable, and no privilege.
DROP_INS = {
    "after-network.conf.j2": ("postgresql@.service", "redis-server.service"),
    "certbot-ca.conf.j2": ("certbot.service",),
}

SECTION = re.compile(r"^\[(Unit|Service|Timer|Install)\]$", re.M)


def systemd_templates() -> dict[str, str]:
    """Each template that is a systemd file (it has a [Unit], [Service], [Timer] or [Install] section) -> its kind:
    service, timer or drop-in."""
    found = {}
    for path in sorted(TEMPLATES.glob("*.j2")):
        if SECTION.search(path.read_text()):
            kind = path.name.removesuffix(".j2").rpartition(".")[2]
            found[path.name] = {"service": "service", "timer": "timer"}.get(kind, "drop-in")
    return found


def measured_in(module: str) -> list[Service]:
    """The services the end-to-end module `module` (its __name__ or file stem) measures."""
    stem = module.rpartition(".")[2]
    return [service for service in SERVICES if service.module == stem]


def release_of(host) -> str:
    """The test server's release (trixie, bookworm), from its /etc/debian_version."""
    return DEBIAN[host.ssh("cat /etc/debian_version").stdout.strip().split(".")[0]]


def exposure(host, unit: str) -> tuple[float, str]:
    """`systemd-analyze security UNIT`'s overall exposure on the test server `host` (0 is best, 10 unsandboxed), and
    its whole output (what to show when the bound is passed)."""
    out = host.ssh(f"systemd-analyze security --no-pager {unit}", check=False).stdout
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: ([\d.]+)", out)
    assert found, out
    return float(found.group(1)), out
