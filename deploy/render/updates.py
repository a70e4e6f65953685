"""Debian's unattended-upgrades for the release's security suite only: its apt.conf.d file, rendered from the
origins `apt-cache policy` lists on the server (pure)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from deploy.commands.updates import UPDATE_HOOK

# After Debian's 20auto-upgrades and 50unattended-upgrades (apt reads apt.conf.d in name order, the last value wins;
# `#clear` empties the list 50unattended-upgrades filled).
UNATTENDED_CONF = PurePosixPath("/etc/apt/apt.conf.d/52prayer-room-unattended-upgrades")
SECURITY_LABEL = "Debian-Security"


def security_origins(policy: str, codename: str) -> list[str]:
    """unattended-upgrades' Origins-Pattern entries for the release's security suite, from `apt-cache policy`'s
    `release o=...,n=...,l=...` lines (the suites apt's sources name on the server); [] when there is none."""
    patterns = []
    for line in policy.splitlines():
        words = line.split(None, 1)
        if words[:1] != ["release"] or len(words) < 2:
            continue
        fields = dict(part.split("=", 1) for part in words[1].split(",") if "=" in part)
        suite, label, origin = fields.get("n", ""), fields.get("l", ""), fields.get("o", "")
        if label == SECURITY_LABEL and suite == f"{codename}-security" and re.fullmatch(r"[\w.+-]+", origin):
            patterns.append(f"origin={origin},codename={suite},label={label}")
    return list(dict.fromkeys(patterns))


def fallback_origin(codename: str) -> str:
    """The pattern Debian's own security suite has, for a server whose apt sources do not list it (yet)."""
    return f"origin=Debian,codename={codename}-security,label={SECURITY_LABEL}"


def render_unattended_upgrades(origins: list[str]) -> str:
    """apt's daily timers fetch the lists and run unattended-upgrade, which installs from `origins` only and never
    reboots (`fab os-update` does, with the maintenance page and a check of the site)."""
    patterns = "\n".join(f'    "{origin}";' for origin in origins)
    return (
        "// Written by `fab provision` (deploy/render/updates.py); edit that, not this file.\n"
        "// Security updates only, installed daily by apt-daily-upgrade.timer; no automatic reboot: `fab status`\n"
        "// says when one is pending and `fab os-update` reboots with the maintenance page up.\n"
        'APT::Periodic::Update-Package-Lists "1";\n'
        'APT::Periodic::Unattended-Upgrade "1";\n'
        "#clear Unattended-Upgrade::Origins-Pattern;\n"
        "#clear Unattended-Upgrade::Allowed-Origins;\n"
        f"Unattended-Upgrade::Origins-Pattern {{\n{patterns}\n}};\n"
        'Unattended-Upgrade::Automatic-Reboot "false";\n'
        "// Every successful `apt-get update` (the daily timer's, `fab os-update`'s, yours) touches a stamp, as\n"
        "// Ubuntu's update-notifier-common does: `fab status` says how old the package lists are.\n"
        f"{UPDATE_HOOK}\n"
    )
