"""The certificate for `domain`: certbot in webroot mode (nginx keeps serving), renewed by Debian's certbot.timer.

Why certbot and not Caddy: nginx already fronts the site and is what the deploy's rolling restart is
measured through; certbot's webroot mode only needs a directory nginx serves on port 80, and its renewal
reloads nginx gracefully (`systemctl reload nginx`: old workers finish their requests).
"""

from __future__ import annotations

import time

from deploy.errors import DeployError
from deploy.remote import Server, sh
from deploy.server_files import CERTIFICATE_SCRIPT, certbot_command, certificate_fits, parse_certificate


def read_certificate(server: Server) -> dict[str, object] | None:
    """The installed certificate's names, expiry and ACME server, or None when there is none."""
    out = server.root(CERTIFICATE_SCRIPT, what="reading the certificate", warn=True).stdout
    return parse_certificate(out)


def has_fitting_certificate(server: Server) -> bool:
    return certificate_fits(server.config, read_certificate(server), time.time())


def obtain_certificate(server: Server) -> str:
    """Ask the ACME server for a certificate for the domain (HTTP-01 answered by nginx from the webroot).

    Returns a note for the step. The certificate present is replaced at once when it does not fit (another
    domain or ACME server, or expired); certbot.timer renews a fitting one itself.
    """
    config = server.config
    current = read_certificate(server)
    result = server.root(
        certbot_command(config, replace=current is not None), what="obtaining the certificate", warn=True, timeout=300
    )
    if result.exited != 0:
        detail = (result.stderr.strip() or result.stdout.strip())[-1200:]
        raise DeployError(
            f"certbot could not get a certificate for {config.domain} from {config.acme_directory}: {detail} -- "
            f"check that {config.domain} resolves to this server and that port 80 is open."
        )
    return f"certificate for {config.domain} issued by {config.acme_directory}"


def ensure_renewal_timer(server: Server) -> bool:
    """certbot.timer (from Debian's certbot package) enabled and running: it renews 30 days before expiry."""
    state = server.root(
        "systemctl is-enabled certbot.timer; systemctl is-active certbot.timer",
        what="checking certbot.timer",
        warn=True,
    ).stdout.split()
    if state[:2] == ["enabled", "active"]:
        return False
    server.root(sh("systemctl", "enable", "--now", "certbot.timer"), what="starting certbot.timer")
    return True
