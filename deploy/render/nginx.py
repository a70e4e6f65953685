"""The nginx sites: a web host's (its web programs, each release's static files, the maintenance page) and the
balancer's (the web hosts' nginx as upstreams)."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import PurePosixPath

from deploy.config import DeployConfig, address_of, trusted_proxy_networks
from deploy.render.cluster_tls import (
    WEB_CERTIFICATE,
    WEB_TLS_NAME,
    WEB_TLS_PORT,
    ca_certificate,
    tls_dir,
    uses_cluster_tls,
)
from deploy.render.jinja import render_template
from deploy.render.site import balancer_address, cluster_site_names, site_names, url_host

# gunicorn's own timeout (WEB_TIMEOUT) is 30 s; nginx must wait at least that long for an answer.
PROXY_READ_TIMEOUT = 60
# A client that sends nothing for this long while uploading its headers or body is dropped.
CLIENT_TIMEOUT = 10
# certbot (webroot mode) writes its HTTP-01 answers under here; nginx serves them on port 80.
ACME_WEBROOT = PurePosixPath("/var/lib/prayer-room-acme")
# certbot --cert-name: the certificate's fixed directory under /etc/letsencrypt/live/, whatever the domain.
CERT_NAME = "prayer-room"
CERT_DIR = PurePosixPath("/etc/letsencrypt/live") / CERT_NAME
HSTS_SECONDS = 31536000
# Seconds a client is told to wait during a maintenance window (the measured window is shorter).
MAINTENANCE_RETRY_AFTER = 30
# The balancer's passive health check: a web host failing this often within FAIL_TIMEOUT s is skipped that long.
BALANCER_MAX_FAILS = 2
BALANCER_FAIL_TIMEOUT = 10


@dataclass(frozen=True)
class NginxFacts:
    """What the server's nginx decides about our site: its version (empty when unknown)."""

    version: tuple[int, ...] = ()

    @property
    def http2_directive(self) -> bool:
        """nginx 1.25.1+ (Debian 13 has 1.26) turns HTTP/2 on with `http2 on;` and warns about listen's old http2
        parameter, which Debian 12's 1.22 needs."""
        return self.version >= (1, 25, 1)


NGINX_FACTS_SCRIPT = "nginx -v 2>&1"  # it prints its version on stderr


def parse_nginx_facts(text: str) -> NginxFacts:
    """NGINX_FACTS_SCRIPT's output."""
    version = re.search(r"nginx/(\d+(?:\.\d+)*)", text)
    return NginxFacts(version=tuple(int(part) for part in version.group(1).split(".")) if version else ())


def render_nginx_site(
    config: DeployConfig,
    host: str,
    *,
    nginx: NginxFacts = NginxFacts(),
    tls: bool = False,
    ipv6: bool = True,
    address: str = "",
    http_port: int = 80,
    https_port: int = 443,
) -> str:
    """The nginx site: config.web_ports behind one upstream, each release's static files, a 444 default server.

    With `tls` (a certificate for config.domain exists) port 80 only answers the ACME challenge and redirects;
    the site is on 443. Each alias answers the ACME challenge and redirects (301) to the domain. `nginx`: the
    server's nginx (its version). `address`, the ports and `ipv6` are for tests, which listen on a loopback port.
    """
    return render_template(
        "nginx-site.conf.j2",
        upstream="prayer_room_web",
        balancer=balancer_address(config),
        # Behind the cluster's balancer, that balancer takes the client's address from the load balancer's header.
        trusted_proxies=[] if balancer_address(config) else trusted_proxy_networks(config),
        cluster_tls=_web_host_tls(config),
        web_ports=config.web_ports,
        server_names=[config.domain] if tls else site_names(config, host),
        root=str(config.layout.root),
        login_rate=config.login_rate_per_minute,
        write_rate=config.write_rate_per_minute,
        **maintenance_context(config),
        **_front_context(config, nginx, tls, ipv6, address, http_port, https_port),
    )


def _front_context(
    config: DeployConfig, nginx: NginxFacts, tls: bool, ipv6: bool, address: str, http_port: int, https_port: int
) -> dict[str, object]:
    """What a web host's site and the balancer's share: the server's nginx, where they listen, the client limits,
    TLS."""
    return {
        "http2_directive": nginx.http2_directive,
        "ipv6": ipv6,
        "address": address,
        "http_port": http_port,
        "https_port": https_port,
        "max_body": "1m",
        "client_timeout": CLIENT_TIMEOUT,
        "read_timeout": PROXY_READ_TIMEOUT,
        "tls": tls,
        "acme_webroot": str(ACME_WEBROOT) if config.domain else "",
        "domain": config.domain,
        "aliases": list(config.aliases),
        "certificate": str(CERT_DIR / "fullchain.pem"),
        "certificate_key": str(CERT_DIR / "privkey.pem"),
        "hsts_seconds": HSTS_SECONDS,
    }


def _web_host_tls(config: DeployConfig) -> dict[str, object] | None:
    """A web host behind a cluster's balancer: where it serves the balancer over TLS, with which certificate."""
    if not (uses_cluster_tls(config) and config.runs("web") and config.role_hosts("balancer")):
        return None
    directory = tls_dir(config)
    return {
        "port": WEB_TLS_PORT,
        "name": WEB_TLS_NAME,
        "certificate": str(directory / f"{WEB_CERTIFICATE}.crt"),
        "key": str(directory / f"{WEB_CERTIFICATE}.key"),
    }


def render_balancer_site(
    config: DeployConfig,
    *,
    nginx: NginxFacts = NginxFacts(),
    tls: bool = False,
    ipv6: bool = True,
    address: str = "",
    http_port: int = 80,
    https_port: int = 443,
    drained: Collection[str] = (),
) -> str:
    """The balancer's nginx site: the web hosts' own nginx as upstreams (over TLS checked against the cluster CA, on
    WEB_TLS_PORT, on every site of several hosts, with or without a db host) with passive health checks and a
    new connection per request, a 444 default server. With `domain` it answers the ACME challenge, and with `tls`
    (its certificate exists) it serves HTTPS and redirects HTTP; each alias redirects to the domain. `drained`: the
    web hosts (deploy.toml's names or their addresses) marked `down`, which get no request (`fab os-update`).
    `address`, the ports and `ipv6` are for tests."""
    out = {address_of(host) for host in drained}
    upstream_tls = {"ca": str(ca_certificate(config)), "name": WEB_TLS_NAME} if uses_cluster_tls(config) else None
    web_port = WEB_TLS_PORT if upstream_tls else 80
    return render_template(
        "nginx-balancer.conf.j2",
        upstream="prayer_room_web_hosts",
        upstream_tls=upstream_tls,
        servers=[
            (f"{url_host(address_of(host))}:{web_port}", address_of(host) in out) for host in config.role_hosts("web")
        ],
        max_fails=BALANCER_MAX_FAILS,
        fail_timeout=BALANCER_FAIL_TIMEOUT,
        server_names=cluster_site_names(config),
        trusted_proxies=trusted_proxy_networks(config),
        **_front_context(config, nginx, tls, ipv6, address, http_port, https_port),
    )


# The internal URI nginx's 503 goes to: the operator's page when it exists, else the kit's own.
MAINTENANCE_URI = "/.prayer-room-maintenance"


def render_maintenance_page(message: str = "") -> str:
    """The maintenance page: the kit's own text, or the operator's `message` (HTML-escaped: it is operator text)."""
    return render_template("maintenance.html", message=message)


def maintenance_context(config: DeployConfig) -> dict[str, object]:
    """The maintenance flags nginx checks (the kit's flag file, the operator's page), the Retry-After it sends, and
    the kit's page (one line: it goes in a string)."""
    page = " ".join(render_maintenance_page().split())
    layout = config.layout
    return {
        "maintenance_flag": str(layout.maintenance_flag),
        "maintenance_page": str(layout.maintenance_page),
        "maintenance_dir": str(layout.maintenance_page.parent),
        "maintenance_page_name": layout.maintenance_page.name,
        "maintenance_uri": MAINTENANCE_URI,
        "retry_after": MAINTENANCE_RETRY_AFTER,
        "page": page,
    }
