"""deploy.toml's trusted_proxies (a load balancer or CDN in front): the front server's nginx takes the client's
address from their X-Forwarded-For only, so rate limits, lockouts and throttles count per client. The rendered
site runs in a real nginx on loopback: 127.0.0.2 stands in for the load balancer, 127.0.0.1 for a client that
reaches the server directly; an upstream records the X-Forwarded-For the app gets (NUM_PROXIES=1 takes its last
entry, tests/unit/test_login_lockout.py)."""

from __future__ import annotations

import http.client
import http.server
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from deploy.config import DeployConfig, load_config, single_host_site
from deploy.errors import DeployError
from deploy.render.cluster_tls import ca_certificate
from deploy.render.nginx import render_balancer_site, render_nginx_site
from tests.support.nginx import nginx_test

BALANCER = "127.0.0.2"  # the load balancer's address (trusted)
DIRECT = "127.0.0.1"  # a client that reaches the server itself (not trusted)

CLUSTER_TOML = """
[environments.cluster]
trusted_proxies = ["10.1.0.0/16", "2001:db8::7"]

[environments.cluster.roles]
web = ["root@10.0.0.2", "root@10.0.0.3"]
worker = ["root@10.0.0.4"]
beat = ["root@10.0.0.4"]
db = ["root@10.0.0.4"]
balancer = ["root@10.0.0.5"]
"""


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["10.0.0.0/33"]', r"trusted_proxies has '10.0.0.0/33', which is not an address or a network"),
        ('["lb.example.org"]', r"trusted_proxies has 'lb.example.org', which is not an address"),
        ('["0.0.0.0/0"]', r"trusted_proxies has '0.0.0.0/0', every address"),
        ('["::/0"]', r"every address: any client could then choose its own address"),
        ('"10.0.0.0/8"', r"trusted_proxies must be a list of addresses or networks"),
    ],
)
def test_trusted_proxies_are_addresses_or_networks(tmp_path, value, message):
    with pytest.raises(DeployError, match=message):
        load_config(config_file(tmp_path, f"[defaults]\ntrusted_proxies = {value}\n"))


def test_the_front_server_believes_the_trusted_proxies_only(tmp_path):
    config = load_config(config_file(tmp_path, '[defaults]\ntrusted_proxies = ["10.1.0.0/16", "2001:db8::7"]\n'))
    assert config.trusted_proxies == ("10.1.0.0/16", "2001:db8::7")
    real_ip = [
        "set_real_ip_from 10.1.0.0/16;",
        "set_real_ip_from 2001:db8::7/128;",
        "real_ip_header X-Forwarded-For;",
        "real_ip_recursive on;",
    ]
    # A single server (with or without a domain): its own nginx, on every server block that proxies to the app.
    single = single_host_site(config, "root@203.0.113.7")
    for tls in (False, True):
        site = render_nginx_site(
            replace(single, domain="prayer.example.org") if tls else single, "203.0.113.7", tls=tls
        )
        proxied = [block for block in site.split("server {") if "proxy_pass" in block]
        assert len(proxied) == 1 and all(f"\n    {line}\n" in proxied[0] for line in real_ip), proxied
    # A cluster behind the kit's balancer: the balancer believes the load balancer; each web host the balancer only.
    cluster = load_config(config_file(tmp_path, CLUSTER_TOML), "cluster")
    balancer = render_balancer_site(cluster.at("10.0.0.5"))
    assert all(f"\n    {line}\n" in balancer for line in real_ip), balancer
    web = render_nginx_site(cluster.at("10.0.0.2"), "10.0.0.2")
    assert "set_real_ip_from 10.0.0.5;" in web and "10.1.0.0/16" not in web and "real_ip_recursive" not in web
    # A cluster without the kit's balancer: the load balancer reaches each web host, which believes it.
    alone = load_config(config_file(tmp_path, CLUSTER_TOML.replace('balancer = ["root@10.0.0.5"]', "")), "cluster")
    assert all(f"\n    {line}\n" in render_nginx_site(alone.at("10.0.0.3"), "10.0.0.3") for line in real_ip)
    # Without the setting nothing changes: no real_ip at all on a single server.
    assert "real_ip" not in render_nginx_site(single_host_site(DeployConfig(), "root@203.0.113.7"), "203.0.113.7")
    # NUM_PROXIES stays the settings' 1 everywhere: nginx has already put the client's address last.
    for bound in (single, cluster.at("10.0.0.2"), alone.at("10.0.0.3")):
        assert "NUM_PROXIES" not in dict(bound.environment_overrides())


class Upstream(http.server.BaseHTTPRequestHandler):
    """Stands in for gunicorn: answers with the X-Forwarded-For nginx sent."""

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def _answer(self):
        body = (self.headers.get("X-Forwarded-For") or "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((DIRECT, 0))
        return probe.getsockname()[1]


class Nginx:
    """The rendered site in a real nginx (foreground, one process) on a loopback port."""

    def __init__(self, directory: Path, site: str, port: int):
        directory.mkdir()
        (directory / "site.conf").write_text(site)
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temp = " ".join(f"{kind}_temp_path {directory}/{kind};" for kind in kinds)
        (directory / "nginx.conf").write_text(
            f"pid {directory}/nginx.pid; error_log {directory}/error.log;\n"
            f"events {{}}\nhttp {{ access_log off; server_tokens off; {temp} include {directory}/site.conf; }}\n"
        )
        self.directory, self.port = directory, port
        command = ["nginx", "-p", str(directory), "-c", str(directory / "nginx.conf")]
        self.process = subprocess.Popen(
            [*command, "-g", "daemon off; master_process off;"], stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((DIRECT, port), timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None, self.process.stderr.read()
                assert time.monotonic() < deadline, "nginx does not listen"
                time.sleep(0.05)

    def request(self, source: str, forwarded: str = "", method: str = "GET", path: str = "/") -> tuple[int, str]:
        """A request from `source` claiming `forwarded`: nginx's status and the X-Forwarded-For the app got."""
        connection = http.client.HTTPConnection(DIRECT, self.port, timeout=10, source_address=(source, 0))
        headers = {"Host": DIRECT, **({"X-Forwarded-For": forwarded} if forwarded else {})}
        try:
            connection.request(method, path, body=b"" if method == "POST" else None, headers=headers)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def last(self, source: str, forwarded: str = "") -> str:
        """The client address the app counts (NUM_PROXIES=1: the last entry of its X-Forwarded-For)."""
        status, received = self.request(source, forwarded)
        assert status == 200, (status, received)
        return received.split(",")[-1].strip()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def upstream():
    server = http.server.ThreadingHTTPServer((DIRECT, 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.deploy  # needs the deploy layer's nginx, which pip cannot install
@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed (.ci/setup.d/20-deploy.sh installs it)")
def test_nginx_takes_the_client_address_from_the_trusted_proxy_only(tmp_path, upstream):
    """Behind a load balancer at 127.0.0.2 (trusted_proxies): the client it names is the address the app and nginx's
    login limit count, a client's own X-Forwarded-For is believed from nobody. The positive controls: without the
    setting every client shares the load balancer's address (one login bucket for all); trusting every address, a
    client reaching the server directly chooses its own."""
    base = single_host_site(replace(DeployConfig(), web_ports=(upstream,)), f"root@{DIRECT}")
    sites = {
        "trusted_proxies": replace(base, trusted_proxies=(f"{BALANCER}/32",)),
        "without": base,
        "trusting every address": replace(base, trusted_proxies=("0.0.0.0/0",)),  # refused by load_config
    }
    seen = {}
    for name, config in sites.items():
        port = free_port()
        site = render_nginx_site(config, DIRECT, ipv6=False, address=DIRECT, http_port=port)
        nginx = Nginx(tmp_path / name.replace(" ", "-"), site, port)
        try:
            seen[name] = {
                "via the balancer": nginx.last(BALANCER, "203.0.113.9"),
                "via the balancer, claiming another": nginx.last(BALANCER, "198.51.100.66, 203.0.113.9"),
                "directly, claiming another": nginx.last(DIRECT, "198.51.100.66"),
                # nginx's login limit (10 a minute, a burst of 10): one client's 11 POSTs, then another client's.
                "logins": [nginx.request(BALANCER, "203.0.113.9", "POST", "/admin/login/")[0] for _ in range(12)]
                + [nginx.request(BALANCER, "203.0.113.10", "POST", "/admin/login/")[0]],
            }
        finally:
            nginx.stop()
    now, without, all_trusted = seen["trusted_proxies"], seen["without"], seen["trusting every address"]
    assert now["via the balancer"] == now["via the balancer, claiming another"] == "203.0.113.9", now
    assert now["directly, claiming another"] == DIRECT, now
    assert now["logins"] == [200] * 11 + [429, 200], now  # the other client has a bucket of its own
    # Without the setting: every client is the balancer, one bucket for all.
    assert without["via the balancer"] == without["via the balancer, claiming another"] == BALANCER, without
    assert without["logins"] == [200] * 11 + [429, 429], without
    # Trusting every address: a client's own header picks its address.
    assert all_trusted["directly, claiming another"] == "198.51.100.66", all_trusted


@pytest.mark.deploy
@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed (.ci/setup.d/20-deploy.sh installs it)")
def test_nginx_accepts_the_balancer_site_with_trusted_proxies(tmp_path):
    cluster = replace(load_config(config_file(tmp_path, CLUSTER_TOML), "cluster"), etc=str(tmp_path / "etc"))
    (tmp_path / "etc").mkdir()  # the cluster CA's certificate, which the balancer checks the web hosts against
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=ca",
         "-keyout", str(tmp_path / "ca.key"), "-out", str(ca_certificate(cluster)), "-days", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    text = render_balancer_site(cluster.at("10.0.0.5"), ipv6=False)
    assert "set_real_ip_from 10.1.0.0/16;" in text
    result = nginx_test(tmp_path, text)
    assert result.returncode == 0, result.stderr
