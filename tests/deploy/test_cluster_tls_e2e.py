"""HTTPS through a cluster's balancer: `fab provision --env cluster` with a domain on two fresh Debian 13 containers
(lb: balancer; app: web, worker, beat, db); the balancer gets the certificate from a real ACME server (Debian's
pebble, validating HTTP-01 against the balancer's nginx) and sends the requests on to the web host over TLS checked
against the cluster CA.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.support import acme
from tests.support.cluster import Cluster
from tests.support.nspawn import missing_tools

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
DOMAIN = "cluster.prayer-room.test"
ROLES = {"lb": ("balancer",), "app": ("web", "worker", "beat", "db")}

_missing = missing_tools() or acme.missing_tools()
pytestmark = [pytest.mark.deploy, pytest.mark.skipif(bool(_missing), reason=str(_missing))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster-tls")
    booted = Cluster.boot(workdir, ROLES)
    pebble = None
    try:
        pebble = acme.Pebble(workdir / "pebble", listen_address=booted.lb.gateway, answer=booted.lb.address).start()
        booted.configure(
            f'domain = "{DOMAIN}"\nacme_email = "ops@prayer-room.test"\n'
            f'acme_directory = "{pebble.directory}"\nacme_ca_bundle = "{pebble.ca}"\n'
        )
        booted.pebble = pebble
        yield booted
    finally:
        if pebble:
            pebble.stop()
        booted.destroy()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "cluster-tls-e2e-timings.json").write_text(json.dumps(booted.timings, indent=1) + "\n")


def https(cluster: Cluster, path: str = "/") -> tuple[int, str, dict]:
    """(status, response head, peer certificate) of GET `path` over HTTPS to DOMAIN at the balancer's address."""
    context = ssl.create_default_context(cadata=cluster.pebble.root_pem())
    with socket.create_connection((cluster.lb.address, 443), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=DOMAIN) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                head += chunk
            return int(head.split()[1]), head.decode(errors="replace"), tls.getpeercert()


def test_01_the_balancer_gets_the_certificate_and_sends_https_requests_on_to_the_web_host(cluster):
    result = cluster.provisioned()
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:] + cluster.pebble.log()
    lb = f"[{cluster.host('lb')}]"
    assert f"{lb}    changed  certificate" in result.stdout
    assert f"certificate for {DOMAIN} issued by {cluster.pebble.directory}" in result.stdout
    status, head, certificate = https(cluster)
    assert status == 502, head  # the web host's nginx answered (nothing is deployed yet)
    assert ("DNS", DOMAIN) in certificate["subjectAltName"]
    assert "Strict-Transport-Security: max-age=31536000; includeSubDomains; preload" in head
    assert cluster.app.ssh("ls /etc/letsencrypt 2>/dev/null; dpkg-query -W certbot 2>/dev/null; true").stdout == ""
    with socket.create_connection((cluster.lb.address, 80), timeout=10) as sock:
        sock.sendall(f"GET /x HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        answer = sock.recv(400).decode()
    assert answer.startswith("HTTP/1.1 301") and f"Location: https://{DOMAIN}/x" in answer, answer
    env = cluster.app.ssh("cat /srv/prayer-room/shared/env").stdout
    assert f"ALLOWED_HOSTS={DOMAIN},127.0.0.1,localhost\n" in env


def test_02_provision_again_changes_nothing(cluster):
    cluster.provisioned()
    started = time.monotonic()
    result = cluster.fab("provision")
    cluster.timings["provision, second run"] = time.monotonic() - started
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "provision cluster cluster: nothing changed on its 2 hosts" in result.stdout, result.stdout[-3000:]


def test_03_status_reads_the_certificate_on_the_balancer(cluster):
    result = cluster.fab("status")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith(f"{cluster.lb.address}: "))
    assert f"certificate: {DOMAIN}, expires in " in line and "WARNING" not in line, line
    assert re.search(rf"^{re.escape(cluster.app.address)}\s+web,worker,beat,db\s+none\s", result.stdout, re.M), (
        result.stdout
    )
