"""The cluster's own TLS: one CA per site of several hosts, created by provision on the CA host (the db host, or the
primary on a site without one; root-only, its key never leaves it), and a certificate per service host naming the
host's cluster address. PostgreSQL and Redis on the db host and each web host's nginx serve one; their clients (the
app hosts, the balancer) trust the CA alone and check the name. A site of one host has none: everything stays on
loopback and the local socket."""

from __future__ import annotations

import ipaddress
from pathlib import PurePosixPath
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from deploy.config import DeployConfig

# The web hosts' certificates all carry this name besides their address: the balancer's one proxy_ssl_name for the
# whole upstream group. Only web hosts get it (the db host's certificate names its address alone).
WEB_TLS_NAME = "web.prayer-room.cluster"
# The port each web host's nginx serves the balancer on (TLS, the cluster certificate); port 80 stays for loopback
# checks and the site's own name.
WEB_TLS_PORT = 8443
# The names of the certificates provision makes: the db host's (PostgreSQL, Redis) and each web host's (nginx).
DB_CERTIFICATE = "db"
WEB_CERTIFICATE = "web"
# A certificate is renewed by provision once it has fewer days left than this.
RENEW_DAYS = 30
CERT_DAYS = 825
CA_DAYS = 3650


def ca_dir(config: DeployConfig) -> PurePosixPath:
    """On the CA host only: the CA's key and certificate, root's, 0700."""
    return config.layout.etc / "cluster-ca"


def ca_certificate(config: DeployConfig) -> PurePosixPath:
    """On every host of the site: the CA's certificate (public), what every cluster client trusts, 0644."""
    return config.layout.etc / "cluster-ca.crt"


def tls_dir(config: DeployConfig) -> PurePosixPath:
    """A host's own certificate and key(s)."""
    return config.layout.etc / "tls"


def uses_cluster_tls(config: DeployConfig) -> bool:
    """Whether the site's hosts talk TLS to each other (and have a cluster CA): every site of several hosts, with a
    db host or without one (the balancer still reaches the web hosts over TLS)."""
    return config.multi_host


def ca_host(config: DeployConfig) -> str:
    """The host that creates and keeps the cluster CA: the db host (whoever holds it has the data anyway), else the
    primary (a site whose PostgreSQL and Redis are managed elsewhere)."""
    db = config.role_hosts("db")
    return db[0] if db else config.primary


def is_ca_host(config: DeployConfig) -> bool:
    """Whether `config` (bound to one host) is bound to the CA host."""
    return uses_cluster_tls(config) and bool(config.hosts) and config.hosts[0] == ca_host(config)


def subject_alt_names(address: str, names: tuple[str, ...] = ()) -> str:
    """The subjectAltName value naming `address` (an IP, else a DNS name) and `names`."""
    try:
        ipaddress.ip_address(address)
        first = f"IP:{address}"
    except ValueError:
        first = f"DNS:{address}"
    return ",".join([first, *(f"DNS:{name}" for name in names)])


def render_server_extensions(address: str, names: tuple[str, ...] = ()) -> str:
    """The X.509v3 extensions the CA signs into a server certificate: its names (set by the signer, whatever the
    request asked for), server authentication only, no CA."""
    return (
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        f"subjectAltName = {subject_alt_names(address, names)}\n"
    )


def database_url_with_tls(url: str, ca: PurePosixPath) -> str:
    """DATABASE_URL with libpq's sslmode=verify-full against the cluster CA (its other query parameters kept)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(sslmode="verify-full", sslrootcert=str(ca))
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def redis_url_for_user(url: str, user: str) -> str:
    """A redis:// or rediss:// URL logging in as the app's ACL `user` (the password and the rest kept)."""
    parts = urlsplit(url)
    auth, _, where = parts.netloc.rpartition("@")
    password = auth.partition(":")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{password}@{where}"))


def redis_url_with_tls(url: str, user: str, ca: PurePosixPath) -> str:
    """A redis:// URL as rediss:// for the app's ACL `user` (the password kept), checked against the cluster CA and
    the URL's host name, both said in the URL rather than left to each library's default. The URL reaches redis-py
    three ways, each of which reads these two (redis-py 8.1, kombu 5.7, celery 5.7, django-environ): kombu's
    parse_url (the broker: ssl_cert_reqs through parse_ssl_cert_reqs, ssl_check_hostname true unless "false"),
    celery's Redis result backend (redis-py's URL parsers: to_bool), and django-environ's cache_url, which moves the
    query into OPTIONS as strings that redis-py's SSLConnection takes as they are. NOTE: so never write
    ssl_check_hostname=false here: the cache would take that string as true; the value is "true"."""
    parts = urlsplit(redis_url_for_user(url, user))
    query = dict(parse_qsl(parts.query))
    query.update(ssl_cert_reqs="required", ssl_check_hostname="true", ssl_ca_certs=str(ca))
    return urlunsplit(parts._replace(scheme="rediss", query=urlencode(query, safe="/")))


def cluster_env_values(config: DeployConfig, values: dict[str, str]) -> dict[str, str]:
    """The site's shared env values with every Redis URL naming the db host's address (loopback on a site of one
    host) logging in as the app's ACL user, on every topology; on a cluster every URL naming it on TLS against the
    cluster CA (an env file from before is brought up to it; another host's URL is left alone)."""
    tls = uses_cluster_tls(config)
    ca = ca_certificate(config)
    fixed = dict(values)
    url = values.get("DATABASE_URL", "")
    if tls and url and urlsplit(url).hostname == config.db_address:
        fixed["DATABASE_URL"] = database_url_with_tls(url, ca)
    for key in ("CELERY_BROKER_URL", "CACHE_URL"):
        url = values.get(key, "")
        parts = urlsplit(url)
        if url and parts.scheme in ("redis", "rediss") and parts.hostname == config.db_address and parts.password:
            fixed[key] = redis_url_with_tls(url, config.user, ca) if tls else redis_url_for_user(url, config.user)
    return fixed
