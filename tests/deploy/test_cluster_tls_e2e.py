"""HTTPS through a cluster without a db host: `fab provision --env cluster` with a domain on two fresh Debian 13
containers (lb: balancer; app: web, worker, beat), PostgreSQL and Redis "managed" outside the cluster (on this machine,
TLS only with a CA of their own: tests/support/managed.py). The operator's documented path: provision stops, naming
the keys the primary's env file needs; the operator places the services' CA on the app host and sets the URLs with
`fab env --set`; provision again; deploy. The balancer gets the certificate from a real ACME server (Debian's pebble,
validating HTTP-01 against the balancer's nginx) and sends the requests on to the web host over TLS checked against
the cluster CA, which the primary (app) holds.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import ssl
import time
from pathlib import Path

import pytest

from deploy.on_server.common import read_env_file
from prayer_room_api.beat import LOCK_KEY
from tests.deploy.target import Clone
from tests.support import acme
from tests.support.cluster import Cluster
from tests.support.managed import ManagedServices
from tests.support.nspawn import missing_tools

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
DOMAIN = "cluster.prayer-room.test"
ROLES = {"lb": ("balancer",), "app": ("web", "worker", "beat")}
ENV_FILE = "/srv/prayer-room/shared/env"
# Where the operator puts the managed services' CA certificate on each app host (the URLs name it).
SERVICES_CA = "/etc/ssl/managed-services-ca.crt"
CLUSTER_CA_KEY = "/etc/prayer-room/cluster-ca/ca.key"
LEADER = (
    "SELECT host(a.client_addr) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = "
    "'advisory' AND l.granted AND l.classid = {} AND l.objid = {} AND l.objsubid = 2".format(*LOCK_KEY)
)
SETTINGS = "web_workers = 1\nworker_concurrency = 1\nhealth_timeout = 40\n"

_missing = missing_tools() or acme.missing_tools()
pytestmark = [pytest.mark.deploy, pytest.mark.skipif(bool(_missing), reason=str(_missing))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster-tls")
    booted = Cluster.boot(workdir, ROLES)
    pebble = managed = None
    try:
        pebble = acme.Pebble(workdir / "pebble", listen_address=booted.lb.gateway, answer=booted.lb.address).start()
        booted.configure(
            f'domain = "{DOMAIN}"\nacme_email = "ops@prayer-room.test"\n'
            f'acme_directory = "{pebble.directory}"\nacme_ca_bundle = "{pebble.ca}"\n{SETTINGS}'
        )
        booted.pebble = pebble
        started = time.monotonic()
        # Reached from the app host only, at its link's gateway (this machine).
        managed = ManagedServices(workdir / "managed", booted.app.gateway, booted.app.address).start()
        booted.timings["managed PostgreSQL and Redis started"] = time.monotonic() - started
        booted.managed = managed
        booted.operator = {}
        yield booted
    finally:
        if managed:
            managed.stop()
        if pebble:
            pebble.stop()
        booted.destroy()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "cluster-tls-e2e-timings.json").write_text(json.dumps(booted.timings, indent=1) + "\n")


def https(cluster: Cluster, path: str = "/") -> tuple[int, str, dict]:
    """(status, response head, peer certificate) of GET `path` over HTTPS to DOMAIN at the balancer's address."""
    status, head, _, certificate = https_response(cluster, path)
    return status, head, certificate


def https_response(cluster: Cluster, path: str = "/") -> tuple[int, str, str, dict]:
    """(status, head, body, peer certificate) of GET `path` over HTTPS to DOMAIN at the balancer's address."""
    context = ssl.create_default_context(cadata=cluster.pebble.root_pem())
    with socket.create_connection((cluster.lb.address, 443), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=DOMAIN) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
            head, _, body = response.decode(errors="replace").partition("\r\n\r\n")
            return int(head.split()[1]), head, body, tls.getpeercert()


def service_urls(cluster: Cluster) -> dict[str, str]:
    """What the operator puts into the primary's env file: the managed services' URLs, TLS against their CA."""
    managed = cluster.managed
    return {
        "DATABASE_URL": managed.database_url(SERVICES_CA),
        "CELERY_BROKER_URL": managed.redis_url(0, SERVICES_CA),
        "CACHE_URL": managed.redis_url(1, SERVICES_CA),
    }


def timed(cluster: Cluster, what: str, *args: str):
    started = time.monotonic()
    result = cluster.fab(*args)
    cluster.timings[what] = time.monotonic() - started
    return result


def provisioned(cluster: Cluster):
    """The operator's path (docs/cluster.md), once: `fab provision` stops, naming the keys for the primary's env file;
    the services' CA placed on the app host; `fab env --set` of the three URLs; `fab provision` again. Its runs
    are kept in `cluster.operator`; returns the last provision's."""
    runs = cluster.operator
    if "provision" not in runs:
        runs["refused"] = timed(cluster, "provision, stopped for the service URLs", "provision")
        pem = cluster.managed.ca.read_text()
        cluster.app.ssh(f"install -m 0644 /dev/null {SERVICES_CA} && printf %s {shlex.quote(pem)} > {SERVICES_CA}")
        sets = [arg for key, url in service_urls(cluster).items() for arg in ("--set", f"{key}={url}")]
        runs["env"] = timed(cluster, "env --set of the three URLs", "env", *sets)
        runs["provision"] = timed(cluster, "provision, first run", "provision")
    return runs["provision"]


def test_00_without_the_service_urls_provision_stops_naming_the_keys_the_primary_needs(cluster):
    provisioned(cluster)
    refused = cluster.operator["refused"]
    assert refused.returncode != 0, refused.stdout[-3000:]
    assert (
        "the cluster cluster has no db host: put DATABASE_URL, CELERY_BROKER_URL, CACHE_URL for your PostgreSQL and "
        f"Redis into {cluster.host('app')}'s {ENV_FILE} (the primary's"
    ) in refused.stdout + refused.stderr, (refused.stdout + refused.stderr)[-3000:]
    env = cluster.operator["env"]
    assert env.returncode == 0, (env.stdout + env.stderr)[-3000:]
    assert cluster.managed.redis_password not in env.stdout + env.stderr  # never printed


def test_01_the_balancer_gets_the_certificate_and_sends_https_requests_on_to_the_web_host(cluster):
    result = provisioned(cluster)
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
    env = cluster.app.ssh(f"cat {ENV_FILE}").stdout
    assert f"ALLOWED_HOSTS={DOMAIN},127.0.0.1,localhost\n" in env
    # The operator's URLs kept as they are (no db host to point them at); no database on the cluster.
    values = read_env_file(env)
    assert {key: values[key] for key in service_urls(cluster)} == service_urls(cluster)
    assert cluster.app.ssh("dpkg-query -W postgresql redis-server 2>/dev/null; true").stdout == ""
    # The primary holds the cluster CA; the balancer has its certificate only, and checks the web host against it.
    assert cluster.app.ssh(f"stat -c %a {CLUSTER_CA_KEY}").stdout.strip() == "600"
    assert cluster.lb.ssh("test -e /etc/prayer-room/cluster-ca && echo present; true").stdout == ""
    ca = cluster.app.ssh("cat /etc/prayer-room/cluster-ca/ca.crt").stdout
    assert cluster.lb.ssh("cat /etc/prayer-room/cluster-ca.crt").stdout == ca != ""
    site = cluster.lb.ssh("cat /etc/nginx/sites-enabled/*").stdout
    assert f"{cluster.app.address}:8443" in site and "proxy_ssl_verify on;" in site, site
    assert "proxy_ssl_trusted_certificate /etc/prayer-room/cluster-ca.crt;" in site, site


def test_02_provision_again_changes_nothing(cluster):
    provisioned(cluster)
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
    assert re.search(rf"^{re.escape(cluster.app.address)}\s+web,worker,beat\s+none\s", result.stdout, re.M), (
        result.stdout
    )


def test_04_a_deploy_serves_the_app_over_https_on_the_managed_postgresql_and_redis(cluster):
    assert provisioned(cluster).returncode == 0
    clone = Clone(cluster.workdir / "repo")
    result = timed(cluster, "deploy, first", "deploy", "--repo", str(clone.path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    release = cluster.app.ssh("readlink /srv/prayer-room/current").stdout.strip().rsplit("/", 1)[-1]
    # A task ran on the worker (the deploy's ping through the app host's own queue came back); beat leads there.
    assert "\n   answered by app\n" in result.stdout, result.stdout[-4000:]
    assert "\n   leader: prayer-room beat app pid " in result.stdout, result.stdout[-4000:]
    status, head, body, _ = https_response(cluster, "/health/")
    assert status == 200 and json.loads(body)["release"] == release, head + body
    managed = cluster.managed
    # The tables are in the managed PostgreSQL; beat leads from the app host; every connection from it is TLS.
    tables = {row[0] for row in managed.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"django_migrations", "prayer_room_api_location"} <= tables, tables
    assert managed.sql(LEADER) == [(cluster.app.address,)]
    connections = managed.sql(
        "SELECT s.ssl, count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
        f" WHERE a.client_addr = '{cluster.app.address}' GROUP BY s.ssl"
    )
    assert [ssl_on for ssl_on, _ in connections] == [True], connections
    # The broker's and the results' keys are in the managed Redis, under the app's prefix.
    keys = [key.decode() for key in managed.redis.client(0).keys("*")]
    assert keys and all(key.startswith("prayer-room:") for key in keys), keys
