"""Provision's step for OS security updates: unattended-upgrades for the release's security suite only."""

from __future__ import annotations

from deploy.commands import updates as commands
from deploy.provision.facts import parse_facts
from deploy.provision.host import ensure_services, sync_file
from deploy.render.updates import UNATTENDED_CONF, fallback_origin, render_unattended_upgrades, security_origins
from deploy.ssh import Server, sh

UNATTENDED_PACKAGE = "unattended-upgrades"


def ensure_security_updates(server: Server) -> tuple[bool, str]:
    """unattended-upgrades installed and set to the security suite of the server's release, as `apt-cache policy`
    names it there, and apt's daily timers enabled and waiting."""
    installed = server.root(
        sh("dpkg-query", "--show", "--showformat=${db:Status-Abbrev}", UNATTENDED_PACKAGE),
        what="checking for unattended-upgrades",
        warn=True,
    ).stdout.startswith("ii")
    if not installed:  # the lists the packages step fetched, else fresh ones
        install = f"{commands.APT} install --no-install-recommends {UNATTENDED_PACKAGE}"
        server.root(
            f"{install} || ({commands.apt_update()} && {install})", what="installing unattended-upgrades", timeout=600
        )
    text = server.root(commands.FACTS, what="reading the release and its apt suites").stdout
    codename = parse_facts(text).get("codename", "")
    origins = security_origins(text, codename)
    note = f"security updates from {', '.join(origins)}"
    if not origins:
        origins = [fallback_origin(codename)]
        note = (
            f"WARNING: apt's sources name no {codename}-security suite, so no security update can arrive; add "
            f"`deb http://security.debian.org/debian-security {codename}-security main` to them "
            f"(unattended-upgrades waits for {origins[0]})"
        )
    changed = not installed
    changed |= sync_file(server, UNATTENDED_CONF, render_unattended_upgrades(origins), owner="root", mode="0644")
    changed |= ensure_services(server, commands.APT_TIMERS)
    return changed, note
