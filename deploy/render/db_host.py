"""What the db host of a site of several hosts gets besides Debian's PostgreSQL and Redis: both listening on its
address, PostgreSQL admitting the app role from each host, and a firewall admitting only those hosts. Redis's
password block is every db host's, a site of one host's too."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from deploy.app import REDIS_KEY_PREFIX
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


# What the app's ACL user may run: what Celery, kombu, the project's broker (EVAL of its Lua script, EVALSHA and
# SCRIPT LOAD of kombu's and redis-py's lock scripts, BLMOVE) and Django's cache use; no admin or dangerous command
# (FLUSHALL, FLUSHDB, CONFIG, REPLICAOF, MODULE, DEBUG, KEYS, MONITOR, SHUTDOWN, ACL, ...), no FUNCTION, no SCRIPT
# but LOAD and EXISTS; on keys and channels under the prefix only (Redis 7 checks a script's declared keys, and
# each key its redis.call touches, against the patterns).
REDIS_ACL_COMMANDS = ("nocommands", "+@all", "-@admin", "-@dangerous", "-@scripting", "+eval", "+evalsha")
REDIS_ACL_SCRIPT = ("+script|load", "+script|exists")


def redis_acl_rules(password: str, prefix: str = REDIS_KEY_PREFIX) -> tuple[str, ...]:
    """The app's ACL user's rules (ACL SETUSER's words, a redis.conf `user` line's after the name)."""
    keys = ("resetkeys", f"~{prefix}*", "resetchannels", f"&{prefix}*")
    return ("reset", "on", f">{password}", *keys, *REDIS_ACL_COMMANDS, *REDIS_ACL_SCRIPT)


@dataclass(frozen=True)
class RedisTLS:
    """A cluster's Redis: TLS on `port` only, with the db host's cluster certificate."""

    port: int
    certificate: str
    key: str
    ca: str


def redis_conf_with_password(
    text: str, password: str, user: str, bind: tuple[str, ...] = (), tls: RedisTLS | None = None
) -> str:
    """Debian's redis.conf with provision's block at its end (no later line overrides it), replacing an older one:
    the default user off and the app's ACL `user` with the password (`redis_acl_rules`), on every topology; CONFIG
    renamed away; with `bind` (`redis_bind`) what it listens on, and on a cluster (`tls`) TLS only."""
    block = render_template(
        "redis.conf.j2", marks=_REDIS_BLOCK, bind=bind, tls=tls, user=user, rules=redis_acl_rules(password)
    )
    return _without_block(text, _REDIS_BLOCK) + "\n\n" + block


# Moves every key of the db whose name lacks the prefix under it, in one step (a script: nothing runs meanwhile): a
# list's items behind those already under the new name (kombu pushes left and takes right: the old, older messages
# are taken first), a hash's fields and a sorted set's members where the new one lacks them (kombu's unacked hash
# and its index), a set's members (binding tables); any other key renamed unless the new name exists. Returns how
# many keys it moved. One line with no double quote or backslash: redis-cli reads it as one quoted word.
REDIS_MOVE_UNDER_PREFIX = " ".join(
    line.strip()
    for line in """
local prefix, keys, cursor = ARGV[1], {}, '0'
repeat
    local page = redis.call('SCAN', cursor, 'COUNT', 1000)
    cursor = page[1]
    for _, key in ipairs(page[2]) do
        if string.sub(key, 1, #prefix) ~= prefix then table.insert(keys, key) end
    end
until cursor == '0'
for _, key in ipairs(keys) do
    local new, kind = prefix .. key, redis.call('TYPE', key)['ok']
    if kind == 'list' then
        while redis.call('LMOVE', key, new, 'LEFT', 'RIGHT') do end
    elseif kind == 'hash' then
        local fields = redis.call('HGETALL', key)
        for i = 1, #fields, 2 do redis.call('HSETNX', new, fields[i], fields[i + 1]) end
    elseif kind == 'zset' then
        local members = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
        for i = 1, #members, 2 do redis.call('ZADD', new, 'NX', members[i + 1], members[i]) end
    elseif kind == 'set' then
        redis.call('SUNIONSTORE', new, new, key)
    elseif redis.call('EXISTS', new) == 0 then
        redis.call('RENAME', key, new)
    end
    redis.call('DEL', key)
end
return #keys
""".strip().splitlines()
)


def has_unprefixed_keys(text: str) -> bool:
    """Whether `text` (redis.conf) has an older provision block, from before the app's keys had the prefix: the
    broker's keys are to be moved under it before the new block takes effect."""
    return _REDIS_BLOCK[0] in text and f"~{REDIS_KEY_PREFIX}*" not in text


def redis_login_before(text: str) -> str | None:
    """The ACL user an older provision block (`text`, redis.conf) gave the app (a cluster's), None for requirepass's
    default user (a site of one host's)."""
    match = re.search(r"^user (?!default )(\S+) on ", text, re.MULTILINE)
    return match.group(1) if match else None


def redis_move_input(password: str, user: str | None, db: int, prefix: str = REDIS_KEY_PREFIX) -> str:
    """redis-cli's input (commands on stdin: the password on no command line) moving db `db`'s keys under
    `prefix`, logged in with an older block's credentials."""
    login = f"AUTH {user} {password}" if user else f"AUTH {password}"
    return f'{login}\nSELECT {db}\nEVAL "{REDIS_MOVE_UNDER_PREFIX}" 0 {prefix}\n'


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
