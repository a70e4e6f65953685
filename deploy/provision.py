"""`fab provision`: take a fresh Debian 12 / Ubuntu 24.04 server to one `fab deploy` can fill; a re-run changes nothing.

Every step first reads what is there and only acts on a difference, so each reports whether it changed
anything. What the files say is rendered by deploy.render (pure); the steps here only compare and upload.
"""

from __future__ import annotations

import io
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import PurePosixPath
from typing import TextIO
from urllib.parse import unquote, urlsplit

from fabric import Connection

from deploy import tls
from deploy.config import DeployConfig, address_of
from deploy.errors import DeployError
from deploy.lock import DeployLock
from deploy.on_server import script
from deploy.on_server.common import read_env_file
from deploy.progress import PrefixedLines, Progress, in_parallel
from deploy.remote import Server, connect, sh
from deploy.render.db_host import (
    FIREWALL_TABLE,
    FIREWALL_UNIT,
    REDIS_CONF,
    firewall_rules_path,
    pg_hba_with_peers,
    redis_bind,
    redis_conf_with_password,
    render_firewall,
    render_firewall_unit,
    render_postgres_listen,
)
from deploy.render.env_file import DATABASE, env_defaults, merge_env_file, sync_env_file
from deploy.render.nginx import ACME_WEBROOT, render_balancer_site, render_nginx_site
from deploy.render.supervisord import SUPERVISORCTL_DEFAULT, render_supervisorctl_default, render_supervisord_main
from deploy.render.systemd import (
    BACKUP_SERVICE,
    BACKUP_TIMER,
    CERTBOT_DROPIN,
    UNIT,
    acme_ca_path,
    backup_helper,
    render_after_network_dropin,
    render_backup_units,
    render_certbot_dropin,
    render_unit,
)
from deploy.server_files import (
    FACTS_SCRIPT,
    check_facts,
    directories,
    has_app,
    parse_facts,
    redis_password,
    scram_matches,
    service_key_problems,
    service_keys_refusal,
    shared_env_values,
)

PACKAGES = ("python3-venv", "postgresql", "redis-server", "nginx", "supervisor")
TLS_PACKAGES = ("certbot", "openssl")  # with `domain`: webroot-mode ACME client, and the certificate's reader
SERVICES = ("postgresql", "redis-server", "nginx")
# A cluster host gets its roles' share: app hosts the programs' needs (and pg_dump: the primary's backups run
# against the db host), the db host PostgreSQL, Redis and the firewall's tool, web hosts and the balancer nginx.
APP_PACKAGES = ("python3-venv", "supervisor", "postgresql-client")
DB_PACKAGES = ("postgresql", "redis-server", "nftables")
SYSTEMD_UNITS = PurePosixPath("/etc/systemd/system")
UNIT_PATH = SYSTEMD_UNITS / UNIT
# PostgreSQL and Redis listen on the db address: they start once the network is up.
NETWORK_DROPINS = tuple(
    SYSTEMD_UNITS / f"{unit}.d" / "prayer-room-network.conf" for unit in ("postgresql@.service", "redis-server.service")
)
NGINX_SITE = PurePosixPath("/etc/nginx/sites-available/prayer-room")
NGINX_ENABLED = PurePosixPath("/etc/nginx/sites-enabled/prayer-room")
NGINX_DEFAULT = PurePosixPath("/etc/nginx/sites-enabled/default")
# VERBOSITY=terse: an error never quotes the statement (which may hold a password) back.
PSQL = ("runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=terse")
_SQL_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


# --- steps on the server -----------------------------------------------------------------------


def connect_for_provision(conn: Connection, config: DeployConfig) -> Server:
    """Open and check the server (reachable, key accepted, root or passwordless sudo, systemd, apt, python3).

    Only reads: a refused server is left exactly as it was.
    """
    # NOTE: deploy.remote.connect also insists the app user exists, which provision is about to create:
    # check against root (always there) and hand back a Server for the configured user.
    checked = connect(conn, replace(config, user="root", require_systemd=True))
    server = Server(conn, config, checked.is_root, checked.sudo_password, app_home=str(config.layout.root))
    facts = parse_facts(server.root(FACTS_SCRIPT, what="inspecting the server").stdout)
    check_facts(facts, server.name)
    return server


def packages_for(config: DeployConfig) -> tuple[str, ...]:
    """What the host needs installed: PACKAGES (and TLS_PACKAGES with a domain), or a cluster host's roles' share."""
    if not config.multi_host:
        return PACKAGES + (TLS_PACKAGES if config.domain else ())
    wanted = [
        *(APP_PACKAGES if has_app(config) else ()),
        *(DB_PACKAGES if config.runs("db") else ()),
        *(("nginx",) if config.runs("web") or config.runs("balancer") else ()),
        *(TLS_PACKAGES if config.domain and config.runs("balancer") else ()),
    ]
    return tuple(dict.fromkeys(wanted))


def services_for(config: DeployConfig) -> tuple[str, ...]:
    """The installed services that must be enabled and running."""
    if not config.multi_host:
        return SERVICES
    return (
        *(("postgresql", "redis-server") if config.runs("db") else ()),
        *(("nginx",) if config.runs("web") or config.runs("balancer") else ()),
    )


def install_packages(server: Server) -> bool:
    """apt-get install what is missing of `packages_for` the host; make sure the services they bring are enabled
    and running."""
    packages = packages_for(server.config)
    query = server.root(
        sh("dpkg-query", "--show", "--showformat=${Package} ${db:Status-Abbrev}\n", *packages),
        what="listing installed packages",
        warn=True,
    )
    installed = {words[0] for words in map(str.split, query.stdout.splitlines()) if words[1:2] == ["ii"]}
    missing = [package for package in packages if package not in installed]
    if missing:
        apt = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300"
        server.root(
            f"{apt} update && {apt} install --no-install-recommends -o Dpkg::Options::=--force-confold {sh(*missing)}",
            what=f"installing {' '.join(missing)} (apt-get)",
            timeout=1200,
        )
    services = services_for(server.config)
    return bool(missing) | (ensure_services(server, services) if services else False)


def ensure_services(server: Server, units: tuple[str, ...]) -> bool:
    """Enable and start each unit that is not already enabled and active."""
    states = server.root(
        f'for u in {sh(*units)}; do echo "$u $(systemctl is-enabled $u) $(systemctl is-active $u)"; done',
        what="checking services",
    )
    todo = [words[0] for words in map(str.split, states.stdout.splitlines()) if words[1:] != ["enabled", "active"]]
    if todo:
        server.root(sh("systemctl", "enable", "--now", *todo), what=f"starting {' '.join(todo)}")
    return bool(todo)


def ensure_app_user(server: Server) -> bool:
    """The unprivileged system users, no login shell: the app user the programs run as (its home the app
    directory), and the build user collectstatic runs as (no home), whose files the app user cannot write.

    Every deploy runs collectstatic, so every host the app is deployed to gets both.
    """
    changed = False
    for user, home in ((server.config.user, server.config.layout.root), (server.config.build_user, "/nonexistent")):
        if server.root(sh("getent", "passwd", user), what=f"looking up the user {user}", warn=True).exited == 0:
            continue
        server.root(
            sh(
                "useradd", "--system", "--user-group", "--no-create-home",
                "--home-dir", home, "--shell", "/usr/sbin/nologin", user,
            ),
            what=f"creating the user {user}",
        )  # fmt: skip
        changed = True
    return changed


def ensure_directories(server: Server, wanted: list[tuple[PurePosixPath, str, str]] | None = None) -> bool:
    """Create or fix the layout's directories (owner and mode), as `directories` lists them (or `wanted`).

    A root-owned directory that was not (a server provisioned before the app user lost them) is taken back
    with everything in it, symlinks themselves not followed.
    """
    wanted = directories(server.config) if wanted is None else wanted
    stat = server.root(
        sh("stat", "--format=%n %U %G %a", *[path for path, _, _ in wanted]), what="checking directories", warn=True
    )
    current = {words[0]: words[1:] for words in map(str.split, stat.stdout.splitlines())}
    todo = [(path, owner, mode) for path, owner, mode in wanted if current.get(str(path)) != [owner, owner, mode]]
    for path, owner, mode in todo:
        command = sh("install", "-d", "-o", owner, "-g", owner, "-m", mode, path)
        if owner == "root" and current.get(str(path), ["root"])[0] != "root":
            command += " && " + sh("chown", "-R", "-P", "--no-dereference", "root:root", path)
        server.root(command, what=f"creating {path}")
    return bool(todo)


def sync_file(server: Server, path: PurePosixPath, text: str, *, owner: str, mode: str) -> bool:
    """Upload `text` to `path` unless it is there already with that owner (user[:group]) and mode; True when it
    changed."""
    return sync_read_file(server, path, server.read(path, what=f"reading {path}"), text, owner=owner, mode=mode)


def sync_read_file(
    server: Server, path: PurePosixPath, current: str | None, text: str, *, owner: str, mode: str
) -> bool:
    """`sync_file` for a file already read: `current` is its text, None when it does not exist."""
    if current == text:
        stat = server.root(sh("stat", "--format=%U:%G %a", path), what=f"checking {path}").stdout.split()
        user, _, group = owner.partition(":")
        if stat == [f"{user}:{group or user}", mode.lstrip("0")]:
            return False
    server.upload([(text, path, owner, mode)], what=f"writing {path}")
    return True


def ensure_env_file(server: Server, host: str) -> tuple[bool, dict[str, str], bool]:
    """Write the shared env file's missing keys (root's, readable by the app user's group: 0640); existing values
    are kept.

    Returns (changed, the values, whether DATABASE_URL was newly generated). Nothing in it is ever printed.
    """
    config = server.config
    existing = server.read(config.layout.env_file, what="reading the env file")
    had_database_url = existing is not None and "DATABASE_URL" in read_env_file(existing)
    defaults = env_defaults(
        config,
        host,
        secret_key=secrets.token_urlsafe(50),
        db_password=secrets.token_urlsafe(24),
        redis_password=secrets.token_urlsafe(32),
    )
    text = merge_env_file(existing, defaults)
    changed = sync_read_file(server, config.layout.env_file, existing, text, owner=f"root:{config.user}", mode="0640")
    return changed, read_env_file(text), not had_database_url


def _psql(server: Server, sql: str | None = None, *, stdin: str | None = None, what: str):
    """psql as PostgreSQL's superuser on the server; `stdin` carries what must not be on a command line."""
    command = sh(*PSQL)
    if sql:
        command += " " + sh("-c", sql)
    kwargs = {"in_stream": io.StringIO(stdin)} if stdin else {}
    return server.root(f"cd / && {command}", what=what, **kwargs)


def ensure_database(
    server: Server, database_url: str, *, new_password: bool | None, address: str = ""
) -> tuple[bool, str]:
    """The PostgreSQL role and database DATABASE_URL names (password auth on 127.0.0.1), UTF-8 whatever the locale.

    On a cluster's db host (`address`: its db address; new_password None) the role's password is set whenever its
    stored verifier is not the URL's password's, so a re-run with the same env file changes nothing.
    """
    url = urlsplit(database_url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1") and not (address and url.hostname == address):
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
    if new_password is None:
        verifier = ""
        if role_exists:
            verifier = _psql(
                server, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'", what="reading the role"
            ).stdout
        new_password = not scram_matches(verifier, password)
    changed = False
    if not role_exists or new_password:
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


def ensure_redis(
    server: Server, values: dict[str, str], *, address: str = "127.0.0.1", bind: tuple[str, ...] = ()
) -> tuple[bool, str]:
    """Debian's redis-server requires the env file's Redis password (requirepass, at the end of its redis.conf);
    a cluster's db host also listens on its db address (`bind`)."""
    password = redis_password(values, address)
    if password is None:
        return False, "CELERY_BROKER_URL names no password for the local Redis: left alone"
    current = server.read(REDIS_CONF, what=f"reading {REDIS_CONF}")
    if current is None:
        raise DeployError(f"{server.name} has no {REDIS_CONF}; is redis-server installed (provision's packages step)?")
    text = redis_conf_with_password(current, password, bind)
    changed = sync_read_file(server, REDIS_CONF, current, text, owner="redis:redis", mode="0640")
    if changed:
        server.root("systemctl restart redis-server", what="restarting redis-server")
    return changed, ""


def ensure_network_dropins(server: Server) -> bool:
    """PostgreSQL and Redis start after the network is up (they listen on the db address)."""
    changed = False
    for path in NETWORK_DROPINS:
        changed |= sync_file(server, path, render_after_network_dropin(), owner="root", mode="0644")
    if changed:
        server.root("systemctl daemon-reload", what="reloading systemd")
    return changed


def ensure_postgres_network(server: Server, database_url: str) -> bool:
    """The db host's PostgreSQL listens on localhost and the db address (a conf.d drop-in; a restart when what it
    listens on differs) and admits DATABASE_URL's role to its database from each cluster host (pg_hba.conf)."""
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
    wanted = render_postgres_listen(config)
    changed = sync_file(server, listen_conf, wanted, owner="postgres:postgres", mode="0644")
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
    elif hba_changed:
        _psql(server, "SELECT pg_reload_conf()", what="reloading PostgreSQL's pg_hba.conf")
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
    """The db host's own nftables table (PostgreSQL and Redis from the cluster's hosts only), loaded at boot by
    FIREWALL_UNIT, and loaded now."""
    config = server.config
    changed = sync_file(server, firewall_rules_path(config), render_firewall(config), owner="root", mode="0644")
    unit = render_firewall_unit(config)
    unit_changed = sync_file(server, SYSTEMD_UNITS / FIREWALL_UNIT, unit, owner="root", mode="0644")
    if unit_changed:
        server.root("systemctl daemon-reload", what="reloading systemd")
    state = server.root(
        f"systemctl is-enabled {FIREWALL_UNIT}; systemctl is-active {FIREWALL_UNIT};"
        f" nft list table inet {FIREWALL_TABLE} >/dev/null 2>&1 && echo loaded",
        what="checking the firewall",
        warn=True,
    ).stdout.split()
    if state[:1] != ["enabled"]:
        server.root(sh("systemctl", "enable", FIREWALL_UNIT), what=f"enabling {FIREWALL_UNIT}")
        changed = True
    if state[1:3] != ["active", "loaded"]:
        server.root(sh("systemctl", "restart", FIREWALL_UNIT), what=f"loading the firewall ({FIREWALL_UNIT})")
        changed = True
    elif changed or unit_changed:
        server.root(sh("systemctl", "reload", FIREWALL_UNIT), what=f"reloading the firewall ({FIREWALL_UNIT})")
    return changed or unit_changed


def ensure_supervisord(server: Server) -> bool:
    """The root-owned supervisord config and the sandboxed systemd unit running it, enabled and started; and
    supervisorctl's default config, so a plain `supervisorctl` as root finds the socket."""
    config = server.config
    layout = config.layout
    debian_changed = mask_debian_supervisor(server)
    conf_changed = sync_file(server, layout.supervisor_conf, render_supervisord_main(config), owner="root", mode="0644")
    unit_changed = sync_file(server, UNIT_PATH, render_unit(config), owner="root", mode="0644")
    ctl_changed = sync_file(
        server, SUPERVISORCTL_DEFAULT, render_supervisorctl_default(config), owner="root", mode="0644"
    )
    changed = conf_changed or unit_changed
    if unit_changed:
        server.root("systemctl daemon-reload", what="reloading systemd")
    state = server.root(f"systemctl is-enabled {UNIT}; systemctl is-active {UNIT}", what=f"checking {UNIT}", warn=True)
    enabled, active = (state.stdout.split() + ["", ""])[:2]
    if enabled != "enabled":
        server.root(sh("systemctl", "enable", UNIT), what=f"enabling {UNIT}")
        changed = True
    if active != "active":
        server.root(sh("systemctl", "start", UNIT), what=f"starting {UNIT}")
        changed = True
    elif changed:
        server.root(sh("systemctl", "restart", UNIT), what=f"restarting {UNIT}")
    wait_for_socket(server, layout.supervisor_socket)
    return changed or ctl_changed or debian_changed


def mask_debian_supervisor(server: Server) -> bool:
    """Debian's system-wide supervisor.service is not ours: stopped and masked, so only the app's supervisord runs.

    NOTE: masked, not only disabled: its ExecStop is a plain `supervisorctl shutdown`, which reads
    SUPERVISORCTL_DEFAULT and would shut the app's supervisord down. It is stopped by a signal for the same reason.
    """
    unit = "supervisor.service"
    state = server.root(
        f"systemctl is-enabled {unit}; systemctl is-active {unit}", what=f"checking Debian's {unit}", warn=True
    )
    if state.stdout.split()[:2] == ["masked", "inactive"]:
        return False
    server.root(
        f"systemctl mask {unit} && systemctl kill --signal=TERM {unit} 2>/dev/null;"
        f" for i in $(seq 100); do systemctl is-active -q {unit} || break; sleep 0.2; done;"
        f" systemctl reset-failed {unit} 2>/dev/null; ! systemctl is-active -q {unit}",
        what=f"stopping and masking Debian's {unit}",
    )
    return True


def ensure_backup_timer(server: Server) -> bool:
    """The daily backup: its helper, service and timer in place, the timer enabled and waiting."""
    config = server.config
    service, timer = render_backup_units(config)
    units = PurePosixPath("/etc/systemd/system")
    changed = sync_file(server, backup_helper(config), script("root_helper"), owner="root", mode="0644")
    units_changed = sync_file(server, units / BACKUP_SERVICE, service, owner="root", mode="0644")
    units_changed |= sync_file(server, units / BACKUP_TIMER, timer, owner="root", mode="0644")
    if units_changed:
        # The copy an older kit installed (one helper for both runtimes) goes once the service no longer names it.
        old_copy = config.layout.etc / "onserver.py"
        server.root(f"rm -f {sh(old_copy)} && systemctl daemon-reload", what="reloading systemd")
    state = server.root(
        f"systemctl is-enabled {BACKUP_TIMER}; systemctl is-active {BACKUP_TIMER}", what="checking the timer", warn=True
    ).stdout.split()
    if state[:2] != ["enabled", "active"]:
        server.root(sh("systemctl", "enable", "--now", BACKUP_TIMER), what=f"starting {BACKUP_TIMER}")
        changed = True
    elif units_changed:
        server.root(sh("systemctl", "restart", BACKUP_TIMER), what=f"restarting {BACKUP_TIMER}")
    return changed or units_changed


def wait_for_socket(server: Server, socket: PurePosixPath, timeout: int = 20) -> None:
    """Wait until supervisord answers on its socket; raise with the unit's last log lines if it does not."""
    probe = f"for i in $(seq {timeout * 5}); do test -S {sh(socket)} && exit 0; sleep 0.2; done; exit 1"
    if server.root(probe, what="waiting for supervisord", warn=True).exited == 0:
        return
    log = server.root(sh("journalctl", "-u", UNIT, "-n", "5", "--no-pager"), what="reading the log", warn=True)
    raise DeployError(f"supervisord did not start on {server.name}: {log.stdout.strip()[-800:]}")


def ensure_nginx(server: Server, host: str, *, tls: bool = False, site: str | None = None) -> bool:
    """The nginx site (HTTPS with `tls`; a balancer's: `site`), enabled in place of Debian's default one, checked
    with `nginx -t` before a reload (graceful: old workers finish their requests).

    A config nginx refuses is taken back (the site as it was, enabled as it was) before the error is raised, so a
    re-run tries again instead of finding the files in place and nginx never reloaded.
    """
    site = site if site is not None else render_nginx_site(server.config, host, tls=tls)
    previous = server.read(NGINX_SITE, what=f"reading {NGINX_SITE}")
    changed = sync_read_file(server, NGINX_SITE, previous, site, owner="root", mode="0644")
    links = server.root(
        f"readlink {sh(NGINX_ENABLED)}; test -e {sh(NGINX_DEFAULT)} && echo default",
        what="checking the enabled nginx sites",
        warn=True,
    ).stdout.split()
    linked = str(NGINX_SITE) in links
    if not linked:
        server.root(sh("ln", "-sfn", NGINX_SITE, NGINX_ENABLED), what="enabling the nginx site")
        changed = True
    if "default" in links:
        server.root(sh("rm", "-f", NGINX_DEFAULT), what="disabling nginx's default site")
        changed = True
    if changed:
        check = server.root("nginx -t", what="checking the nginx config", warn=True)
        if check.exited != 0:
            if previous is None:
                server.root(sh("rm", "-f", NGINX_SITE), what="taking the refused nginx site back")
            elif previous != site:
                server.upload([(previous, NGINX_SITE, "root", "0644")], what="taking the refused nginx site back")
            if not linked:
                server.root(sh("rm", "-f", NGINX_ENABLED), what="taking the refused nginx site back")
            raise DeployError(f"nginx refused the site on {server.name}: {check.stderr.strip()[-800:]}")
        server.root("systemctl reload-or-restart nginx", what="reloading nginx")
    return changed


def ensure_certificate(server: Server, host: str, site: Callable[[], str] | None = None) -> tuple[bool, str]:
    """A certificate for the domain (certbot, webroot mode: nginx already answers the challenge on port 80),
    then the HTTPS site (or the balancer's, `site`); certbot.timer renews it, trusting acme_ca_bundle if given. A
    fitting one is kept."""
    config = server.config
    changed = False
    if config.acme_ca_bundle:
        with open(config.acme_ca_bundle) as bundle:
            changed |= sync_file(server, acme_ca_path(config), bundle.read(), owner="root", mode="0644")
        if sync_file(server, CERTBOT_DROPIN, render_certbot_dropin(config), owner="root", mode="0644"):
            server.root("systemctl daemon-reload", what="reloading systemd")
            changed = True
    note = ""
    if not tls.has_fitting_certificate(server):
        note = tls.obtain_certificate(server)
        changed = True
    changed |= ensure_nginx(server, host, tls=True, site=site() if site else None)
    changed |= tls.ensure_renewal_timer(server)
    return changed, note


# --- the whole thing --------------------------------------------------------------------------


def summary(where: str, progress: Progress, seconds: float | None = None) -> str:
    """The closing line: how many steps changed the server (none on a re-run), and the total time (or `seconds`)."""
    changed = [step.name for step in progress.steps if step.changed]
    seconds = progress.elapsed if seconds is None else seconds
    if not changed:
        return f"provision {where}: nothing changed, the server was already provisioned ({seconds:.1f} s)"
    what = f"{len(changed)} of {len(progress.steps)} steps changed the server ({', '.join(changed)})"
    return f"provision {where}: {what} in {seconds:.1f} s"


def provision(conn: Connection, config: DeployConfig, *, progress: Progress | None = None) -> str:
    """Check the server, then bring each part to the wanted state, each step reported by `progress`.

    Returns the summary line.
    """
    server = connect_for_provision(conn, config)
    host = conn.host
    progress = progress or Progress(f"provision {server.name}")

    def step(name: str, action: Callable[[], bool | tuple[bool, str]]) -> None:
        with progress.step(name) as outcome:
            result = action()
            outcome.changed, outcome.note = result if isinstance(result, tuple) else (result, "")

    env: dict[str, object] = {}

    def env_file() -> bool:
        changed, env["values"], env["new_password"] = ensure_env_file(server, host)
        return changed

    def nginx() -> bool:
        # With a domain and no certificate yet, the site starts on plain HTTP: the ACME challenge needs it.
        return ensure_nginx(server, host, tls=bool(config.domain) and tls.has_fitting_certificate(server))

    step("packages", lambda: install_packages(server))
    step("app user", lambda: ensure_app_user(server))
    step("directories", lambda: ensure_directories(server))
    # The deploy lock lives in the app directory: from here on no deploy, rollback or restart runs meanwhile.
    with DeployLock(server, "provision").held():
        step("env file", env_file)
        step(
            "database",
            lambda: ensure_database(server, env["values"]["DATABASE_URL"], new_password=bool(env["new_password"])),
        )
        step("redis", lambda: ensure_redis(server, env["values"]))
        step("supervisord", lambda: ensure_supervisord(server))
        step("nginx", nginx)
        if config.domain:
            step("certificate", lambda: ensure_certificate(server, host))
        step("backup timer", lambda: ensure_backup_timer(server))
    return summary(server.name, progress)


# --- a cluster ---------------------------------------------------------------------------------


class ClusterHost:
    """One host of the cluster being provisioned: its connection, bound config, progress, and outcome."""

    def __init__(self, conn: Connection, config: DeployConfig, out: TextIO, lock: threading.Lock) -> None:
        self.conn, self.config = conn, config
        self.host = config.hosts[0]
        self.progress = Progress(f"provision {self.host}", out=PrefixedLines(f"[{self.host}] ", out, lock))
        self.server: Server | None = None
        self.error: str = ""

    def step(self, name: str, action: Callable[[], bool | tuple[bool, str]]) -> None:
        with self.progress.step(name) as outcome:
            result = action()
            outcome.changed, outcome.note = result if isinstance(result, tuple) else (result, "")

    def run(self, phase: Callable[[ClusterHost], None]) -> None:
        """Run `phase` unless this host already failed; a failure is kept, naming the step it happened in."""
        if self.error:
            return
        try:
            phase(self)
        except DeployError as exc:
            failed = [step.name for step in self.progress.steps if not step.ok]
            self.error = f"{self.host} ({failed[-1] if failed else 'connecting'}): {exc}"
            self.progress.say(f"FAILED: {exc}")

    @property
    def changed(self) -> bool:
        return any(step.changed for step in self.progress.steps)

    @property
    def seconds(self) -> float:
        """The time its own steps took (the db host's before the others', then its share beside theirs)."""
        return sum(step.seconds for step in self.progress.steps)


def _in_parallel(hosts: list[ClusterHost], phase: Callable[[ClusterHost], None]) -> None:
    """`phase` on every host at once; each host keeps its own DeployError (`run`), anything else is raised."""
    in_parallel(lambda host: host.run(phase), hosts, name=lambda host: host.host)


def _connect(host: ClusterHost) -> None:
    host.server = connect_for_provision(host.conn, host.config)


def _db_steps(shared: dict[str, str]) -> Callable[[ClusterHost], None]:
    """The db host's part, done before any other host's: PostgreSQL and Redis for the cluster, behind the firewall."""

    def phase(host: ClusterHost) -> None:
        server, config = host.server, host.config
        host.step("packages", lambda: install_packages(server))
        # The firewall first: PostgreSQL and Redis never listen on the db address unfiltered.
        host.step("firewall", lambda: ensure_firewall(server))
        host.step("postgresql", lambda: ensure_postgres_network(server, shared["DATABASE_URL"]))
        host.step(
            "database",
            lambda: ensure_database(server, shared["DATABASE_URL"], new_password=None, address=config.db_address),
        )
        host.step("redis", lambda: ensure_redis(server, shared, address=config.db_address, bind=redis_bind(config)))

    return phase


def ensure_cluster_env_file(server: Server, host: str, shared: dict[str, str]) -> bool:
    """An app host's env file: the cluster's shared values (the primary's), this host's missing defaults; every
    other line kept. Nothing in it is ever printed."""
    config = server.config
    existing = server.read(config.layout.env_file, what="reading the env file")
    text = sync_env_file(existing, shared, _fresh_env_defaults(config, host))
    return sync_read_file(server, config.layout.env_file, existing, text, owner=f"root:{config.user}", mode="0640")


def _fresh_env_defaults(config: DeployConfig, host: str) -> dict[str, str]:
    return env_defaults(
        config,
        address_of(host),
        secret_key=secrets.token_urlsafe(50),
        db_password=secrets.token_urlsafe(24),
        redis_password=secrets.token_urlsafe(32),
    )


def _host_steps(shared: dict[str, str]) -> Callable[[ClusterHost], None]:
    """Every host's own part, for its roles only (the db host's packages are already in)."""

    def phase(host: ClusterHost) -> None:
        server, config = host.server, host.config
        if not config.runs("db"):
            host.step("packages", lambda: install_packages(server))
        if has_app(config):
            host.step("app user", lambda: ensure_app_user(server))
            host.step("directories", lambda: ensure_directories(server))
            with DeployLock(server, "provision").held():
                host.step("env file", lambda: ensure_cluster_env_file(server, host.host, shared))
                host.step("supervisord", lambda: ensure_supervisord(server))
                if config.runs("web"):
                    host.step("nginx", lambda: ensure_nginx(server, host.host))
                if host.host == config.primary:
                    host.step("backup timer", lambda: ensure_backup_timer(server))
        if config.runs("balancer"):
            _balancer_steps(host)

    return phase


def _balancer_steps(host: ClusterHost) -> None:
    """The balancer's site; with `domain` it holds the certificate (the ACME challenge first, on plain HTTP)."""
    server, config = host.server, host.config
    if config.domain:
        host.step("acme webroot", lambda: ensure_directories(server, [(ACME_WEBROOT, "root", "755")]))

    def site() -> bool:
        secure = bool(config.domain) and tls.has_fitting_certificate(server)
        return ensure_nginx(server, host.host, site=render_balancer_site(config, tls=secure))

    host.step("balancer", site)
    if config.domain:
        host.step(
            "certificate", lambda: ensure_certificate(server, host.host, lambda: render_balancer_site(config, tls=True))
        )


def cluster_env_values(primary: ClusterHost) -> dict[str, str]:
    """The env values every app host shares: the primary's env file's, generated where it has none (a first run).

    Refused when they would not reach the cluster's PostgreSQL and Redis: with a db host, URLs naming another
    host; without one (managed services), URLs missing or still naming 127.0.0.1. Nothing is printed.
    """
    server, config = primary.server, primary.config
    existing = server.read(config.layout.env_file, what="reading the primary's env file")
    values = read_env_file(existing) if existing else {}
    shared = shared_env_values(values, _fresh_env_defaults(config, primary.host))
    wrong = service_key_problems(config, shared)
    if not wrong:
        return shared
    raise DeployError(service_keys_refusal(config, primary.host, wrong))


def _prepare_primary_env_file(primary: ClusterHost) -> None:
    """Without a db host and its URLs: the primary gets its app user, layout and env file (secrets and all but
    SERVICE_ENV_KEYS), so the operator has a file to add them to."""
    server = primary.server
    primary.step("app user", lambda: ensure_app_user(server))
    primary.step("directories", lambda: ensure_directories(server))
    primary.step("env file", lambda: ensure_cluster_env_file(server, primary.host, {}))


def cluster_summary(config: DeployConfig, hosts: list[ClusterHost], elapsed: float) -> str:
    """One line per host (what changed, or nothing), then the cluster's total."""
    lines = [
        f"FAILED {host.error}" if host.error else summary(host.host, host.progress, host.seconds) for host in hosts
    ]
    changed = [host.host for host in hosts if host.changed]
    if not changed:
        total = f"nothing changed on its {len(hosts)} hosts, the cluster was already provisioned ({elapsed:.1f} s)"
    else:
        total = f"{len(changed)} of {len(hosts)} hosts changed in {elapsed:.1f} s"
    return "\n".join([*lines, f"provision cluster {config.name}: {total}"])


def provision_cluster(conns: list[Connection], config: DeployConfig, *, out: TextIO | None = None) -> str:
    """Provision each host of a cluster for its roles: the db host first (the others need it), then the others in
    parallel, each one's lines prefixed with its name. Returns the summary; a failure raises DeployError naming the
    host and the step, after the other hosts have finished (a re-run goes on from where each stopped)."""
    started = time.monotonic()
    out = out or sys.stdout
    lock = threading.Lock()
    hosts = [ClusterHost(conn, config.at(conn.host), out, lock) for conn in conns]
    by_name = {host.host: host for host in hosts}
    primary = by_name.get(config.primary)
    if primary is None:  # provisioning only some hosts: the env values still come from the primary
        template = conns[0]
        conn = Connection(config.primary, config=template.config, connect_timeout=template.connect_timeout)
        primary = ClusterHost(conn, config.for_host(config.primary), out, lock)
    _in_parallel(list(dict.fromkeys([*hosts, primary])), _connect)
    _raise_failures(config, hosts if primary in hosts else [*hosts, primary], started, out)

    try:
        shared = cluster_env_values(primary)
    except DeployError:
        if not config.db_address and primary in hosts:
            primary.run(_prepare_primary_env_file)
        raise
    db = [host for host in hosts if host.config.runs("db")]
    for host in db:
        host.run(_db_steps(shared))
    _raise_failures(config, hosts, started, out)
    _in_parallel(hosts, _host_steps(shared))
    _raise_failures(config, hosts, started, out)
    return cluster_summary(config, hosts, time.monotonic() - started)


def _raise_failures(config: DeployConfig, hosts: list[ClusterHost], started: float, out: TextIO) -> None:
    failed = [host for host in hosts if host.error]
    if failed:
        print(cluster_summary(config, hosts, time.monotonic() - started), file=out, flush=True)
        raise DeployError(
            "provision failed on " + "; ".join(host.error for host in failed) + " -- the steps done stay done: fix "
            "that and run provision again."
        )
