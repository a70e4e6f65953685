"""A real ACME server for the TLS tests: Debian's `pebble`, with `pebble-challtestsrv` as its DNS.

pebble listens with a certificate from a throwaway CA made here (that CA is the `acme_ca_bundle` the
provisioned server trusts for talking to it); challtestsrv answers every A query with the container's
address, so pebble's HTTP-01 validation really fetches the token from the container's nginx on port 80.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

from tests.support.ca import make_listener_certificate, stop_processes, wait_port
from tests.support.stack import free_port

TOOLS = ("pebble", "pebble-challtestsrv", "openssl")


def missing_tools() -> str | None:
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    return f"missing {', '.join(missing)} (.ci/setup.d/26-tls.sh installs them)" if missing else None


class Pebble:
    """pebble on `listen_address` (reachable from the container), its DNS answering `answer` for every name; the
    certificates it issues valid for `validity_days` (pebble's default: 5 years)."""

    def __init__(self, workdir: Path, listen_address: str, answer: str, *, port: int = 14000,
                 validity_days: float | None = None):  # fmt: skip
        self.workdir = workdir
        self.listen_address = listen_address
        self.answer = answer
        self.port = port
        self.validity_days = validity_days
        self.management_port = free_port()
        self.dns_port = free_port()
        self._procs: list[subprocess.Popen] = []

    @property
    def directory(self) -> str:
        return f"https://{self.listen_address}:{self.port}/dir"

    def start(self, listener: tuple[Path, Path, Path] | None = None) -> Pebble:
        """Start it; `listener` (CA, certificate, key) is another pebble's, so a server trusting that one trusts this
        one too (by default a new CA of its own)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.listener = listener or make_listener_certificate(
            self.workdir / "listener", [self.listen_address, "127.0.0.1"], ca_name="prayer-room test ACME CA"
        )
        self.ca, cert, key = self.listener
        self._spawn(
            ["pebble-challtestsrv", "-defaultIPv4", self.answer, "-defaultIPv6", "", "-dns01",
             f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{free_port()}"],
            "challtestsrv.log",
        )  # fmt: skip
        config = {
            "pebble": {
                "listenAddress": f"{self.listen_address}:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(cert),
                "privateKey": str(key),
                "httpPort": 80,
                "tlsPort": 443,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        if self.validity_days is not None:
            config["pebble"]["certificateValidityPeriod"] = int(self.validity_days * 86400)
        (self.workdir / "pebble.json").write_text(json.dumps(config))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        self._spawn(
            ["pebble", "-config", str(self.workdir / "pebble.json"), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            "pebble.log",
            env=env,
        )
        wait_port(self.listen_address, self.port)
        wait_port("127.0.0.1", self.management_port)
        return self

    def _spawn(self, argv: list[str], log: str, env: dict | None = None) -> None:
        out = (self.workdir / log).open("wb")
        self._procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))

    def root_pem(self) -> str:
        """The root pebble signs the certificates it issues with (a new one each pebble run)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return response.read().decode()

    def log(self) -> str:
        return (self.workdir / "pebble.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        stop_processes(self._procs)
