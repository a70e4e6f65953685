"""What the db host of a site of several hosts gets besides Debian's PostgreSQL and Redis: both listening on its
address, PostgreSQL admitting the app role from each host, and a firewall admitting only those hosts. Redis's
password block is every db host's, a site of one host's too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from deploy.config import DeployConfig
from deploy.render.jinja import render_template
from deploy.render.site import POSTGRES_PORT, REDIS_PORT

REDIS_CONF = PurePosixPath("/etc/redis/redis.conf")
_REDIS_BLOCK = ("# --- fab provision (prayer-room): begin", "# --- fab provision (prayer-room): end")
_PG_HBA_BLOCK = ("# --- fab provision (prayer-room cluster): begin", "# --- fab provision (prayer-room cluster): end")
FIREWALL_TABLE = "prayer_room"
FIREWALL_UNIT = "prayer-room-firewall.service"
NFT = "/usr/sbin/nft"


def _without_block(text: str, marks: tuple[str, str]) -> str:
    lines, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == marks[0]:
            inside = True
        elif line.strip() == marks[1]:
            inside = False
        elif not inside:
            lines.append(line)
    return "".join(lines).rstrip("\n")


@dataclass(frozen=True)
class RedisTLS:
    """A cluster's Redis: TLS on `port` only, with the db host's cluster certificate, and one ACL user (`user`, the
    app's) in place of the default user."""

    port: int
    certificate: str
    key: str
    ca: str
    user: str


def redis_conf_with_password(text: str, password: str, bind: tuple[str, ...] = (), tls: RedisTLS | None = None) -> str:
    """Debian's redis.conf with provision's block at its end (no later line overrides it), replacing an older one:
    the password (requirepass; on a cluster, `tls`: TLS only and the app's ACL user instead), CONFIG renamed away
    (with the password, CONFIG SET could still make Redis write files), and with `bind` (`redis_bind`) what it
    listens on."""
    block = render_template("redis.conf.j2", password=password, marks=_REDIS_BLOCK, bind=bind, tls=tls)
    return _without_block(text, _REDIS_BLOCK) + "\n\n" + block


def redis_bind(config: DeployConfig) -> tuple[str, ...]:
    """What the db host's Redis listens on: on a site of several hosts loopback (IPv6's if there is one: `-`) and
    the db address; on a site of one host nothing is added to Debian's own bind (loopback)."""
    return ("127.0.0.1", "-::1", config.db_address) if config.multi_host else ()


def render_postgres_listen(config: DeployConfig, certificate: str = "", key: str = "") -> str:
    """The conf.d drop-in making the db host's PostgreSQL listen on localhost and the db address, serving TLS with
    the cluster `certificate` and `key` (files on the db host)."""
    return render_template(
        "postgresql-listen.conf.j2", addresses=["localhost", config.db_address], certificate=certificate, key=key
    )


def _host_network(address: str) -> str:
    return f"{address}/128" if ":" in address else f"{address}/32"


def pg_hba_with_peers(text: str, config: DeployConfig, role: str, database: str) -> str:
    """Debian's pg_hba.conf with provision's block at its end, replacing an older one: `role` may reach
    `database` from each app host of the site (not the balancer), over TLS (hostssl) and scram-sha-256 only
    (Debian's own lines come first and match nothing but loopback and the local socket)."""
    block = render_template(
        "pg_hba.conf.j2",
        marks=_PG_HBA_BLOCK,
        role=role,
        database=database,
        addresses=[_host_network(address) for address in config.app_addresses],
    )
    return _without_block(text, _PG_HBA_BLOCK) + "\n\n" + block


def firewall_rules_path(config: DeployConfig) -> PurePosixPath:
    return config.layout.etc / "firewall.nft"


def render_firewall(config: DeployConfig) -> str:
    """The db host's nftables table: PostgreSQL and Redis only from loopback and the site's app hosts (not the
    balancer), its chain's policy drop; nothing else filtered (SSH, nginx), no other table touched."""
    peers = config.app_addresses
    return render_template(
        "firewall.nft.j2",
        table=FIREWALL_TABLE,
        unit=FIREWALL_UNIT,
        ports=[POSTGRES_PORT, REDIS_PORT],
        ipv4=[address for address in peers if ":" not in address],
        ipv6=[address for address in peers if ":" in address],
    )


def render_firewall_unit(config: DeployConfig) -> str:
    """FIREWALL_UNIT: loads the table before the network is up (and at every boot); stopping it leaves the table."""
    return render_template("firewall.service.j2", table=FIREWALL_TABLE, nft=NFT, rules=str(firewall_rules_path(config)))
