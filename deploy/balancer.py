"""The cluster's balancer during `fab os-update`: a web host drained (marked `down` in the balancer's upstream, nginx
reloaded, the requests it was already sent left to finish) before it is upgraded and rebooted, and put back once it
is verified.

The balancer's site is the one `fab provision` renders (deploy/render/nginx.py), with the drained host marked; a
host left drained by a failed os-update goes back at the next os-update that verifies it, or at the next provision.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from deploy import tls
from deploy.config import address_of
from deploy.provision.host import NGINX_SITE, ensure_nginx, holds_certificate, read_nginx_facts
from deploy.render.nginx import CLIENT_TIMEOUT, PROXY_READ_TIMEOUT, render_balancer_site
from deploy.ssh import Server, sh

# Seconds the nginx workers of the balancer's old config have to finish the requests they hold (a web host's answer
# is waited for PROXY_READ_TIMEOUT at most, a client's upload CLIENT_TIMEOUT between its packets).
DRAIN_TIMEOUT = PROXY_READ_TIMEOUT + CLIENT_TIMEOUT + 5
WORKERS = "pgrep -d ' ' -f '^nginx: worker process'; true"
UPSTREAM = "prayer_room_web_hosts"
# What puts a drained web host back: the os-update that verifies it, or provision's render of the balancer's site.
PUT_BACK = (
    "`fab os-update` once it answers (it verifies the host, then takes the `down` mark off), or `fab provision` "
    "(the balancer's site with every web host)"
)


def site(server: Server, drained: Collection[str] = ()) -> str:
    """The balancer's site as provision renders it now (its nginx's version, HTTPS once its certificate is there),
    with the `drained` web hosts marked down."""
    config = server.config
    secure = holds_certificate(config) and tls.has_fitting_certificate(server)
    return render_balancer_site(config, nginx=read_nginx_facts(server), tls=secure, drained=drained)


def drain(server: Server, host: str) -> tuple[bool, str]:
    """Take web host `host` out of the balancer's upstream and wait until the nginx workers that could still send
    it a request (those of the config before) have finished their requests and exited. Whether the balancer's site
    changed, and a note for the step."""
    before = server.root(WORKERS, what="listing the balancer's nginx workers").stdout.split()
    if not ensure_nginx(server, site(server, [host])):
        return False, "it was drained already"
    left = wait_gone(server, before, DRAIN_TIMEOUT)
    if left:  # a client slower than every timeout: its request is the only one that may still reach the host
        return True, f"{len(left)} old nginx worker(s) still busy after {DRAIN_TIMEOUT} s; going on"
    return True, "the requests it was sent are answered"


def put_back(server: Server) -> bool:
    """Every web host in the balancer's upstream again (the site as provision renders it)."""
    return ensure_nginx(server, site(server))


def wait_gone(server: Server, pids: Collection[str], timeout: int) -> list[str]:
    """Wait until none of `pids` runs (a reloaded nginx's old workers exit once their requests are answered); those
    still running after `timeout` s."""
    if not pids:
        return []
    probe = (
        f"for i in $(seq {timeout * 5}); do left=''; for p in {sh(*pids)}; do kill -0 $p 2>/dev/null && "
        'left="$left $p"; done; [ -z "$left" ] && exit 0; sleep 0.2; done; echo $left'
    )
    return server.root(probe, what="waiting for the balancer's old nginx workers", timeout=timeout + 30).stdout.split()


def upstream_servers(site_text: str) -> list[tuple[str, bool]]:
    """The web hosts' addresses in the balancer's upstream (its nginx site's text), each with whether it is drained
    (marked `down`), in the site's order."""
    block = re.search(rf"^upstream {UPSTREAM} \{{(.*?)^\}}", site_text, re.M | re.S)
    if block is None:
        return []
    found = []
    for line in block.group(1).splitlines():
        words = line.split("#", 1)[0].replace(";", " ; ").split()
        if len(words) < 2 or words[0] != "server":
            continue
        hostport = words[1]
        address = hostport[1:].partition("]")[0] if hostport.startswith("[") else hostport.rpartition(":")[0]
        found.append((address or hostport, "down" in words[2:]))
    return found


def upstream_lines(balancer: str, web_hosts: Sequence[str], site_text: str | None) -> list[str]:
    """`fab status`'s lines on the balancer's upstream (read from its nginx site, what nginx was last reloaded
    with): the web hosts it sends requests to, those drained, and those of deploy.toml it does not know."""
    if site_text is None:
        return [f"ALERT balancer {balancer}: no nginx site at {NGINX_SITE}; `fab provision`"]
    servers = upstream_servers(site_text)
    serving = [address for address, down in servers if not down]
    drained = [address for address, down in servers if down]
    missing = [address_of(h) for h in web_hosts if address_of(h) not in {a for a, _ in servers}]
    lines = [f"balancer {balancer}: sends requests to {', '.join(serving) or 'no web host'}"]
    if drained:
        lines.append(
            f"ALERT balancer {balancer}: drained (marked down, no request goes to it): {', '.join(drained)}; "
            f"put back by {PUT_BACK}"
        )
    if missing:
        lines.append(f"ALERT balancer {balancer}: not in its upstream: {', '.join(missing)}; `fab provision`")
    return lines


def read_upstream(server: Server, balancer: str, web_hosts: Sequence[str]) -> list[str]:
    """`upstream_lines` of the balancer `server` (a root session), named `balancer`."""
    return upstream_lines(balancer, web_hosts, server.read(NGINX_SITE, what="reading the balancer's nginx site"))
