"""Provision's steps on the db host: the PostgreSQL role and database, Redis's password, and on a site of several
hosts both listening on the db address behind the host's own firewall."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from deploy.errors import DeployError
from deploy.provision.cluster_tls import key_copy, server_certificate_paths
from deploy.provision.host import SYSTEMD_UNITS, ensure_nft_table, sync_file, sync_read_file
from deploy.render.cluster_tls import DB_CERTIFICATE, ca_certificate, uses_cluster_tls
from deploy.render.db_host import (
    FIREWALL_TABLE,
    FIREWALL_UNIT,
    REDIS_CONF,
    REDIS_KEY_PREFIX,
    RedisTLS,
    firewall_rules_path,
    has_unprefixed_keys,
    pg_hba_with_peers,
    redis_bind,
    redis_conf_with_password,
    redis_login_before,
    redis_move_input,
    render_firewall,
    render_firewall_unit,
    render_postgres_listen,
)
from deploy.render.env_file import DATABASE
from deploy.render.site import LOOPBACK, REDIS_PORT, url_host
from deploy.render.systemd import render_after_network_dropin
from deploy.ssh import Server, sh

# PostgreSQL and Redis listen on the db address: they start once the network is up.
NETWORK_DROPINS = tuple(
    SYSTEMD_UNITS / f"{unit}.d" / "prayer-room-network.conf" for unit in ("postgresql@.service", "redis-server.service")
)
# VERBOSITY=terse: an error never quotes the statement (which may hold a password) back.
PSQL = ("runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=terse")
_SQL_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _psql(server: Server, sql: str | None = None, *, stdin: str | None = None, what: str):
    """psql as PostgreSQL's superuser on the server; `stdin` carries what must not be on a command line."""
    command = sh(*PSQL)
    if sql:
        command += " " + sh("-c", sql)
    kwargs = {"in_stream": io.StringIO(stdin)} if stdin else {}
    return server.root(f"cd / && {command}", what=what, **kwargs)


def scram_matches(verifier: str, password: str) -> bool:
    """Whether PostgreSQL's stored SCRAM-SHA-256 verifier (pg_authid.rolpassword) is that of `password`: provision
    checks the role against the env file's password without ever sending it to be compared."""
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(\S+)", verifier.strip())
    if not match:
        return False
    iterations, salt = int(match[1]), base64.b64decode(match[2])
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return hmac.compare_digest(base64.b64encode(stored_key).decode(), match[3]) and hmac.compare_digest(
        base64.b64encode(server_key).decode(), match[4]
    )


def ensure_database(server: Server, database_url: str) -> tuple[bool, str]:
    """The PostgreSQL role and database DATABASE_URL names (password auth), UTF-8 whatever the locale; a URL naming
    another server than this one (loopback, or the db address) is left alone.

    The role's password is set whenever its stored verifier is not the URL's password's, so a re-run with the same
    env file changes nothing.
    """
    url = urlsplit(database_url)
    if url.hostname not in (*LOOPBACK, server.config.db_address):
        return False, f"DATABASE_URL points at {url.hostname}: left alone"
    role, name = url.username or "", url.path.lstrip("/")
    if not (_SQL_NAME.fullmatch(role) and _SQL_NAME.fullmatch(name)):
        raise DeployError(
            "the env file's DATABASE_URL user and database name must be lower-case letters, digits and _; fix it there."
        )
    exists = _psql(
        server,
        f"SELECT (SELECT count(*) FROM pg_roles WHERE rolname = '{role}'),"
        f" (SELECT count(*) FROM pg_database WHERE datname = '{name}')",
        what="looking up the database",
    ).stdout.strip()
    role_exists, database_exists = (part == "1" for part in exists.split("|"))
    password = unquote(url.password or "")
    verifier = ""
    if role_exists:
        verifier = _psql(
            server, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'", what="reading the role"
        ).stdout
    changed = False
    if not scram_matches(verifier, password):
        verb = "ALTER" if role_exists else "CREATE"
        quoted = password.replace("'", "''")
        # The password goes through stdin, never on a command line.
        _psql(server, stdin=f"{verb} ROLE \"{role}\" LOGIN PASSWORD '{quoted}';\n", what=f"setting up the role {role}")
        changed = True
    if not database_exists:
        _psql(
            server,
            f"CREATE DATABASE \"{name}\" OWNER \"{role}\" ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
            " TEMPLATE template0",
            what=f"creating the database {name}",
        )
        changed = True
    return changed, ""


def redis_password(values: Mapping[str, str], address: str = "127.0.0.1") -> str | None:
    """The password of the Redis at `address` (the db host's: loopback on a site of one host) the env file's broker
    URL names; None for another Redis (left alone)."""
    url = urlsplit(values.get("CELERY_BROKER_URL", ""))
    if url.scheme not in ("redis", "rediss") or url.netloc.rpartition("@")[2] != f"{url_host(address)}:{REDIS_PORT}":
        return None
    return unquote(url.password) if url.password else None


def ensure_redis(server: Server, values: Mapping[str, str], certificate_changed: bool = False) -> tuple[bool, str]:
    """Debian's redis-server admits only the app's ACL user, with the env file's Redis password, on the keys and
    channels under the app's prefix (the block at the end of its redis.conf), on every topology; on a site of several
    hosts it also listens on the db address (`redis_bind`), over TLS only (`redis_tls`); a restart when its config
    or its certificate (`certificate_changed`) changed. A Redis from before the prefix first has the broker's keys
    moved under it (`move_keys_under_prefix`): no queued or unacknowledged message is left behind."""
    config = server.config
    password = redis_password(values, config.db_address)
    if password is None:
        return False, "CELERY_BROKER_URL names no password for the local Redis: left alone"
    current = server.read(REDIS_CONF, what=f"reading {REDIS_CONF}")
    if current is None:
        raise DeployError(f"{server.name} has no {REDIS_CONF}; is redis-server installed (provision's packages step)?")
    tls = redis_tls(server)
    text = redis_conf_with_password(current, password, config.user, redis_bind(config), tls)
    note = ""
    if text != current and has_unprefixed_keys(current):
        db = int(urlsplit(values["CELERY_BROKER_URL"]).path.strip("/") or 0)
        moved = move_keys_under_prefix(server, password, redis_login_before(current), db, tls)
        note = f"moved {moved} key(s) of the broker under {REDIS_KEY_PREFIX}"
    changed = sync_read_file(server, REDIS_CONF, current, text, owner="redis:redis", mode="0640")
    if changed or certificate_changed:
        server.root("systemctl restart redis-server", what="restarting redis-server")
    return changed or certificate_changed, note


def move_keys_under_prefix(server: Server, password: str, user: str | None, db: int, tls: RedisTLS | None) -> int:
    """Db `db`'s keys moved under the app's prefix (REDIS_MOVE_UNDER_PREFIX) in the running Redis, logged in as its
    config before this provision has it (`user`, or requirepass's default user): the count of keys moved.

    NOTE: programs of the release from before the prefix still publish under the old names until the new config's
    restart (a second or so later) shuts them out; a task the web published then is resent by the outbox's sweep."""
    config = server.config
    where = ["-h", config.db_address, "-p", str(REDIS_PORT)]
    if tls is not None:
        where += ["--tls", "--cacert", tls.ca]
    result = server.root(
        f"cd / && {sh('redis-cli', *where)}",
        what=f"moving the broker's Redis keys under {REDIS_KEY_PREFIX}",
        in_stream=io.StringIO(redis_move_input(password, user, db)),
    )
    replies = result.stdout.split()
    if replies[:2] != ["OK", "OK"] or len(replies) != 3 or not replies[2].isdigit():
        raise DeployError(
            f"moving the broker's Redis keys under {REDIS_KEY_PREFIX} failed on {server.name}: "
            f"{' '.join(replies)[-300:] or result.stderr.strip()[-300:]}; redis.conf is left as it was."
        )
    return int(replies[2])


def redis_tls(server: Server) -> RedisTLS | None:
    """On a cluster: Redis's TLS port, the db host's cluster certificate and Redis's copy of its key, and the CA;
    None on a site of one host."""
    config = server.config
    if not uses_cluster_tls(config):
        return None
    certificate, _ = server_certificate_paths(server, DB_CERTIFICATE)
    return RedisTLS(
        port=REDIS_PORT,
        certificate=str(certificate),
        key=str(key_copy(server, DB_CERTIFICATE, "redis")),
        ca=str(ca_certificate(config)),
    )


def ensure_network_dropins(server: Server) -> bool:
    """PostgreSQL and Redis start after the network is up (they listen on the db address)."""
    changed = False
    for path in NETWORK_DROPINS:
        changed |= sync_file(server, path, render_after_network_dropin(), owner="root", mode="0644")
    if changed:
        server.root("systemctl daemon-reload", what="reloading systemd")
    return changed


def ensure_postgres_network(server: Server, database_url: str, certificate_changed: bool = False) -> bool:
    """The db host's PostgreSQL listens on localhost and the db address (a conf.d drop-in; a restart when what it
    listens on differs), serves TLS with the host's cluster certificate (a reload when it or the drop-in changed:
    `certificate_changed`) and admits DATABASE_URL's role to its database from each host of the site over TLS only
    (pg_hba.conf)."""
    config = server.config
    url = urlsplit(database_url)
    role, name = url.username or "", url.path.lstrip("/") or DATABASE
    wait_for_postgres(server)
    live = _psql(
        server,
        "SELECT current_setting('config_file'), current_setting('hba_file'), current_setting('listen_addresses')",
        what="reading PostgreSQL's settings",
    ).stdout.strip()
    config_file, hba_file, listening = live.split("|")
    listen_conf = PurePosixPath(config_file).parent / "conf.d" / "prayer-room-listen.conf"
    certificate, key = server_certificate_paths(server, DB_CERTIFICATE)
    wanted = render_postgres_listen(config, str(certificate), str(key_copy(server, DB_CERTIFICATE, "postgres")))
    conf_changed = sync_file(server, listen_conf, wanted, owner="postgres:postgres", mode="0644")
    changed = conf_changed
    changed |= ensure_network_dropins(server)
    hba = server.read(hba_file, what=f"reading {hba_file}")
    if hba is None:
        raise DeployError(f"{server.name} has no {hba_file}; is PostgreSQL installed (provision's packages step)?")
    hba_changed = sync_read_file(
        server, PurePosixPath(hba_file), hba, pg_hba_with_peers(hba, config, role, name), owner="postgres:postgres",
        mode="0640",
    )  # fmt: skip
    if listening != f"localhost,{config.db_address}":
        server.root("systemctl restart postgresql", what="restarting PostgreSQL")
        wait_for_postgres(server)
        changed = True
    elif hba_changed or conf_changed or certificate_changed:
        _psql(server, "SELECT pg_reload_conf()", what="reloading PostgreSQL's settings and pg_hba.conf")
        wait_for_postgres(server)
    return changed or hba_changed


def wait_for_postgres(server: Server, timeout: int = 60) -> None:
    """Wait until PostgreSQL accepts connections on its socket (a freshly installed cluster starts in the background,
    after apt-get returns); raise with the cluster unit's last log lines if it does not."""
    probe = f"for i in $(seq {timeout * 5}); do pg_isready -q && exit 0; sleep 0.2; done; exit 1"
    if server.root(probe, what="waiting for PostgreSQL", warn=True).exited == 0:
        return
    log = server.root("journalctl -u 'postgresql*' -n 5 --no-pager", what="reading the log", warn=True)
    raise DeployError(f"PostgreSQL did not start on {server.name}: {log.stdout.strip()[-800:]}")


def ensure_firewall(server: Server) -> bool:
    """The db host's own nftables table (PostgreSQL and Redis from the site's app hosts only), loaded at boot by
    FIREWALL_UNIT, and loaded now."""
    config = server.config
    return ensure_nft_table(
        server, firewall_rules_path(config), render_firewall(config), FIREWALL_UNIT, render_firewall_unit(config),
        FIREWALL_TABLE, "the firewall",
    )  # fmt: skip
