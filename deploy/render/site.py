"""What a site's files agree on: the names it answers to, its balancer, and how an address goes into a URL."""

from __future__ import annotations

from deploy.config import DeployConfig, address_of

POSTGRES_PORT = 5432
REDIS_PORT = 6379
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def url_host(address: str) -> str:
    """`address` as the host part of a URL or host:port (an IPv6 address in brackets)."""
    return f"[{address}]" if ":" in address else address


def cluster_site_names(config: DeployConfig) -> list[str]:
    """The names a site of several hosts answers to: the domain, else the balancer's address, else the web hosts'."""
    if config.domain:
        return [config.domain]
    if config.role_hosts("balancer"):
        return [address_of(config.role_hosts("balancer")[0])]
    return list(dict.fromkeys(address_of(host) for host in config.role_hosts("web")))


def site_names(config: DeployConfig, host: str) -> list[str]:
    """The names the site answers to: the configured domain, then the address or name given with -H (a site of
    several hosts: `cluster_site_names`, the same on every host)."""
    if config.multi_host:
        return cluster_site_names(config)
    names = [name for name in (config.domain, host) if name]
    return list(dict.fromkeys(names))


def balancer_address(config: DeployConfig) -> str:
    """The site's balancer's address (the one source whose X-Forwarded-* headers the web hosts believe), or ""."""
    balancer = config.role_hosts("balancer")
    return address_of(balancer[0]) if balancer else ""
