"""Provision's cluster CA steps: the CA on the CA host (the db host, else the primary; created once, root-only), its
certificate on every host, and a server certificate for each host that serves the others (the db host; each web host),
its key made on that host and its names chosen here, never by the host that asks."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from pathlib import PurePosixPath

from deploy.commands import ca as ca_commands
from deploy.commands import sh
from deploy.errors import DeployError
from deploy.provision.host import sync_file
from deploy.render.cluster_tls import (
    CA_DAYS,
    CERT_DAYS,
    RENEW_DAYS,
    ca_certificate,
    ca_dir,
    render_server_extensions,
    tls_dir,
)
from deploy.ssh import Server


class ClusterCA:
    """The CA host's CA (the db host's, else the primary's), shared by every host's provision thread: one command at
    a time on that host's connection. Its key never leaves that host; only signed certificates and the CA's
    certificate do."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._lock = threading.Lock()
        self._pem: str | None = None

    def ensure(self) -> bool:
        """Create the CA unless it exists; True when it was created."""
        config = self.server.config
        with self._lock:
            result = self.server.root(
                ca_commands.create_ca(ca_dir(config), f"prayer-room cluster CA ({config.name})", CA_DAYS),
                what="creating the cluster CA",
            )
            self._pem = None
        return "created" in result.stdout

    def certificate(self) -> str:
        """The CA's certificate (PEM)."""
        with self._lock:
            if self._pem is None:
                pem = self.server.read(ca_dir(self.server.config) / "ca.crt", what="reading the cluster CA")
                if not pem:
                    raise DeployError(
                        f"the cluster CA is missing on {self.server.name}: run `fab provision` for the "
                        "whole cluster (without -H)."
                    )
                self._pem = pem
            return self._pem

    def sign(self, request: str, address: str, names: Sequence[str]) -> str:
        """A certificate for `request` naming `address` and `names` (the request's own names are ignored)."""
        command = ca_commands.sign(
            ca_dir(self.server.config),
            request,
            render_server_extensions(address, tuple(names)),
            secrets.randbits(63),
            CERT_DAYS,
        )
        with self._lock:
            return self.server.root(command, what=f"signing the certificate of {address}").stdout


def ensure_ca_certificate(server: Server, ca: ClusterCA) -> bool:
    """The CA's certificate on this host, where its clients (and its own openssl checks) read it."""
    return sync_file(server, ca_certificate(server.config), ca.certificate(), owner="root", mode="0644")


def server_certificate_paths(server: Server, name: str) -> tuple[PurePosixPath, PurePosixPath]:
    """(certificate, root-only key) of this host's certificate `name`."""
    directory = tls_dir(server.config)
    return directory / f"{name}.crt", directory / f"{name}.key"


def key_copy(server: Server, name: str, group: str) -> PurePosixPath:
    """The copy of the key `name` a service running as `group` reads (root:group 0640: PostgreSQL accepts it)."""
    return tls_dir(server.config) / f"{name}-{group}.key"


def ensure_server_certificate(
    server: Server, ca: ClusterCA, name: str, address: str, names: Sequence[str] = (), groups: Sequence[str] = ()
) -> bool:
    """This host's certificate `name`, signed by the cluster CA for `address` (and `names`), valid for RENEW_DAYS
    more days, its key made here; a copy of the key for each service group in `groups`. A fitting one is kept."""
    cert, key = server_certificate_paths(server, name)
    fits = ca_commands.certificate_fits(cert, key, ca_certificate(server.config), address, RENEW_DAYS)
    for group in groups:
        copy = key_copy(server, name, group)
        owner = sh(f"root:{group} 640")
        fits += f" && cmp -s {sh(key)} {sh(copy)} && [ \"$(stat -c '%U:%G %a' {sh(copy)})\" = {owner} ]"
    if server.root(fits, what=f"checking the certificate {cert}", warn=True).exited == 0:
        return False
    request = server.root(ca_commands.signing_request(key, name), what=f"making the key {key}").stdout
    signed = ca.sign(request, address, names)
    installs = [f"mv {sh(f'{key}.new')} {sh(key)}"]
    installs += [
        sh("install", "-o", "root", "-g", group, "-m", "0640", key, key_copy(server, name, group)) for group in groups
    ]
    server.upload([(signed, cert, "root", "0644")], then=" && ".join(installs), what=f"installing {cert}")
    return True
