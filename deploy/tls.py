"""The certificate for `domain`: certbot in webroot mode (nginx keeps serving), renewed by Debian's certbot.timer.

Why certbot and not Caddy: nginx already fronts the site and is what the deploy's rolling restart is
measured through; certbot's webroot mode only needs a directory nginx serves on port 80, and its renewal
reloads nginx gracefully (`systemctl reload nginx`: old workers finish their requests).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Mapping
from pathlib import PurePosixPath

from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.render.jinja import shell_join
from deploy.render.nginx import ACME_WEBROOT, CERT_DIR, CERT_NAME
from deploy.render.systemd import acme_ca_path
from deploy.ssh import Server, sh

RENEWAL_CONF = PurePosixPath("/etc/letsencrypt/renewal") / f"{CERT_NAME}.conf"
# `fab status` warns when the certificate expires sooner (certbot renews 30 days before).
EXPIRY_WARNING_DAYS = 14


def wanted_names(config: DeployConfig) -> list[str]:
    """The names the one certificate must hold: `domain` first, then its aliases."""
    return [config.domain, *config.aliases]


def certbot_command(config: DeployConfig, *, replace: bool) -> str:
    """certbot certonly in webroot mode (nginx keeps running) for config.domain and its aliases (one certificate),
    saved for certbot.timer's renewals with the same server and the deploy hook that reloads nginx; `replace`
    re-issues at once (with other names, certbot replaces the names of the certificate `prayer-room`)."""
    words = [
        "certbot", "certonly", "--non-interactive", "--agree-tos", "--email", config.acme_email,
        "--server", config.acme_directory, "--webroot", "--webroot-path", ACME_WEBROOT,
        "--cert-name", CERT_NAME, "--domains", ",".join(wanted_names(config)),
        "--deploy-hook", "systemctl reload nginx",
    ]  # fmt: skip
    words += ["--force-renewal"] if replace else ["--keep-until-expiring"]
    command = shell_join(words)
    if config.acme_ca_bundle:
        command = f"REQUESTS_CA_BUNDLE={shell_join([acme_ca_path(config)])} {command}"
    return command


CERTIFICATE_SCRIPT = f"""\
if [ -f {CERT_DIR}/fullchain.pem ]; then
    openssl x509 -in {CERT_DIR}/fullchain.pem -noout -enddate -ext subjectAltName
    sed -n 's/^server *= */server=/p' {RENEWAL_CONF}
fi
"""


def parse_certificate(text: str) -> dict[str, object] | None:
    """CERTIFICATE_SCRIPT's output: the names, expiry (epoch seconds) and ACME server; None without a certificate."""
    expiry = re.search(r"^notAfter=(.+)$", text, re.M)
    if not expiry:
        return None
    server = re.search(r"^server=(\S+)", text, re.M)
    return {
        "names": re.findall(r"DNS:([^,\s]+)", text),
        "expires": calendar.timegm(time.strptime(expiry.group(1).strip(), "%b %d %H:%M:%S %Y %Z")),
        "server": server.group(1) if server else "",
    }


def names_match(config: DeployConfig, certificate: Mapping[str, object]) -> bool:
    """The certificate holds exactly the wanted names (domain and aliases), whatever their order and case."""
    return {name.lower() for name in certificate["names"]} == {name.lower() for name in wanted_names(config)}


def certificate_fits(config: DeployConfig, certificate: Mapping[str, object] | None, now: float) -> bool:
    """A certificate nginx can serve for the site: it names exactly the domain and its aliases (a name changed in
    deploy.toml re-issues it), is unexpired, and comes from acme_directory."""
    return bool(
        certificate
        and names_match(config, certificate)
        and certificate["expires"] > now
        and certificate["server"] == config.acme_directory
    )


def certificate_line(config: DeployConfig, certificate: Mapping[str, object] | None, now: float) -> str:
    """`fab status`'s line: the days left, a WARNING under EXPIRY_WARNING_DAYS (renewal is not working)."""
    if certificate is None:
        return f"certificate: none for {config.domain}; run `fab provision`"
    days = int((certificate["expires"] - now) // 86400)
    names = ", ".join(certificate["names"])
    date = time.strftime("%Y-%m-%d", time.gmtime(certificate["expires"]))
    line = f"certificate: {names}, expires in {days} days ({date})"
    if days < EXPIRY_WARNING_DAYS:
        line += (
            f"  WARNING: under {EXPIRY_WARNING_DAYS} days; certbot.timer should have renewed it 30 days before: "
            "see `journalctl -u certbot` on the server"
        )
    if not names_match(config, certificate):
        line += f"  WARNING: deploy.toml wants {', '.join(wanted_names(config))}: `fab provision` re-issues it"
    return line


def read_certificate(server: Server) -> dict[str, object] | None:
    """The installed certificate's names, expiry and ACME server, or None when there is none."""
    out = server.root(CERTIFICATE_SCRIPT, what="reading the certificate", warn=True).stdout
    return parse_certificate(out)


def has_fitting_certificate(server: Server) -> bool:
    return certificate_fits(server.config, read_certificate(server), time.time())


def obtain_certificate(server: Server) -> str:
    """Ask the ACME server for a certificate for the domain (HTTP-01 answered by nginx from the webroot).

    Returns a note for the step. The certificate present is replaced at once when it does not fit (another
    set of names, ACME server, or expired); certbot.timer renews a fitting one itself.
    """
    config = server.config
    names = ", ".join(wanted_names(config))
    current = read_certificate(server)
    result = server.root(
        certbot_command(config, replace=current is not None), what="obtaining the certificate", warn=True, timeout=300
    )
    if result.exited != 0:
        detail = (result.stderr.strip() or result.stdout.strip())[-1200:]
        raise DeployError(
            f"certbot could not get a certificate for {names} from {config.acme_directory}: {detail} -- "
            f"check that {'each of them resolves' if config.aliases else 'it resolves'} to this server and that "
            "port 80 is open."
        )
    return f"certificate for {names} issued by {config.acme_directory}"


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
