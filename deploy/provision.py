"""`fab provision`: take a fresh Debian 12 / Ubuntu 24.04 server to one `fab deploy` can fill; a re-run changes nothing.

Every step first reads what is there and only acts on a difference, so each reports whether it changed
anything. What the files say is rendered by deploy.server_files (pure); the steps here only compare and upload.
"""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from fabric import Connection

from deploy import tls
from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.lock import DeployLock
from deploy.onserver import read_env_file
from deploy.progress import Progress
from deploy.remote import HELPER_SOURCE, Server, connect, sh
from deploy.server_files import (
    BACKUP_SERVICE,
    BACKUP_TIMER,
    CERTBOT_DROPIN,
    FACTS_SCRIPT,
    REDIS_CONF,
    SUPERVISORCTL_DEFAULT,
    UNIT,
    acme_ca_path,
    backup_helper,
    check_facts,
    directories,
    env_defaults,
    merge_env_file,
    parse_facts,
    redis_conf_with_password,
    redis_password,
    render_backup_units,
    render_certbot_dropin,
    render_nginx_site,
    render_supervisorctl_default,
    render_supervisord_main,
    render_unit,
)

PACKAGES = ("python3-venv", "postgresql", "redis-server", "nginx", "supervisor")
TLS_PACKAGES = ("certbot", "openssl")  # with `domain`: webroot-mode ACME client, and the certificate's reader
SERVICES = ("postgresql", "redis-server", "nginx")
UNIT_PATH = PurePosixPath("/etc/systemd/system") / UNIT
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


def install_packages(server: Server) -> bool:
    """apt-get install what is missing of PACKAGES (and TLS_PACKAGES with a domain); make sure the services they
    bring are enabled and running."""
    packages = PACKAGES + (TLS_PACKAGES if server.config.domain else ())
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
    return bool(missing) | ensure_services(server, SERVICES)


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
    """The unprivileged system user the programs run as, its home the app directory, no login shell."""
    user = server.config.user
    if server.root(sh("getent", "passwd", user), what="looking up the app user", warn=True).exited == 0:
        return False
    server.root(
        sh(
            "useradd", "--system", "--user-group", "--no-create-home",
            "--home-dir", server.config.layout.root, "--shell", "/usr/sbin/nologin", user,
        ),
        what=f"creating the app user {user}",
    )  # fmt: skip
    return True


def ensure_directories(server: Server) -> bool:
    """Create or fix the layout's directories (owner and mode), as `directories` lists them.

    A root-owned directory that was not (a server provisioned before the app user lost them) is taken back
    with everything in it, symlinks themselves not followed.
    """
    wanted = directories(server.config)
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


def ensure_database(server: Server, database_url: str, *, new_password: bool) -> tuple[bool, str]:
    """The PostgreSQL role and database DATABASE_URL names (password auth on 127.0.0.1), UTF-8 whatever the locale."""
    url = urlsplit(database_url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        return False, f"DATABASE_URL points at {url.hostname}: left alone"
    role, name = url.username or "", url.path.lstrip("/")
    if not (_SQL_NAME.fullmatch(role) and _SQL_NAME.fullmatch(name)):
        raise DeployError(
            "the env file's DATABASE_URL user and database name must be lower-case letters, digits and _; fix it there."
        )

    def psql(sql: str | None = None, *, stdin: str | None = None, what: str):
        command = sh(*PSQL)
        if sql:
            command += " " + sh("-c", sql)
        kwargs = {"in_stream": io.StringIO(stdin)} if stdin else {}
        return server.root(f"cd / && {command}", what=what, **kwargs)

    exists = psql(
        f"SELECT (SELECT count(*) FROM pg_roles WHERE rolname = '{role}'),"
        f" (SELECT count(*) FROM pg_database WHERE datname = '{name}')",
        what="looking up the database",
    ).stdout.strip()
    role_exists, database_exists = (part == "1" for part in exists.split("|"))
    password = unquote(url.password or "").replace("'", "''")
    changed = False
    if not role_exists or new_password:
        verb = "ALTER" if role_exists else "CREATE"
        # The password goes through stdin, never on a command line.
        psql(stdin=f"{verb} ROLE \"{role}\" LOGIN PASSWORD '{password}';\n", what=f"setting up the role {role}")
        changed = True
    if not database_exists:
        psql(
            f"CREATE DATABASE \"{name}\" OWNER \"{role}\" ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
            " TEMPLATE template0",
            what=f"creating the database {name}",
        )
        changed = True
    return changed, ""


def ensure_redis(server: Server, values: dict[str, str]) -> tuple[bool, str]:
    """Debian's redis-server requires the env file's Redis password (requirepass, at the end of its redis.conf)."""
    password = redis_password(values)
    if password is None:
        return False, "CELERY_BROKER_URL names no password for the local Redis: left alone"
    current = server.read(REDIS_CONF, what=f"reading {REDIS_CONF}")
    if current is None:
        raise DeployError(f"{server.name} has no {REDIS_CONF}; is redis-server installed (provision's packages step)?")
    text = redis_conf_with_password(current, password)
    changed = sync_read_file(server, REDIS_CONF, current, text, owner="redis:redis", mode="0640")
    if changed:
        server.root("systemctl restart redis-server", what="restarting redis-server")
    return changed, ""


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
    changed = sync_file(server, backup_helper(config), HELPER_SOURCE.read_text(), owner="root", mode="0644")
    units_changed = sync_file(server, units / BACKUP_SERVICE, service, owner="root", mode="0644")
    units_changed |= sync_file(server, units / BACKUP_TIMER, timer, owner="root", mode="0644")
    if units_changed:
        server.root("systemctl daemon-reload", what="reloading systemd")
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


def ensure_nginx(server: Server, host: str, *, tls: bool = False) -> bool:
    """The nginx site (HTTPS with `tls`), enabled in place of Debian's default one, checked with `nginx -t` before
    a reload (graceful: old workers finish their requests)."""
    site = render_nginx_site(server.config, host, tls=tls)
    changed = sync_file(server, NGINX_SITE, site, owner="root", mode="0644")
    links = server.root(
        f"readlink {sh(NGINX_ENABLED)}; test -e {sh(NGINX_DEFAULT)} && echo default",
        what="checking the enabled nginx sites",
        warn=True,
    ).stdout.split()
    if str(NGINX_SITE) not in links:
        server.root(sh("ln", "-sfn", NGINX_SITE, NGINX_ENABLED), what="enabling the nginx site")
        changed = True
    if "default" in links:
        server.root(sh("rm", "-f", NGINX_DEFAULT), what="disabling nginx's default site")
        changed = True
    if changed:
        check = server.root("nginx -t", what="checking the nginx config", warn=True)
        if check.exited != 0:
            raise DeployError(f"nginx refused the site on {server.name}: {check.stderr.strip()[-800:]}")
        server.root("systemctl reload-or-restart nginx", what="reloading nginx")
    return changed


def ensure_certificate(server: Server, host: str) -> tuple[bool, str]:
    """A certificate for the domain (certbot, webroot mode: nginx already answers the challenge on port 80),
    then the HTTPS site; certbot.timer renews it, trusting acme_ca_bundle if given. A fitting one is kept."""
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
    changed |= ensure_nginx(server, host, tls=True)
    changed |= tls.ensure_renewal_timer(server)
    return changed, note


# --- the whole thing --------------------------------------------------------------------------


def summary(where: str, progress: Progress) -> str:
    """The closing line: how many steps changed the server (none on a re-run), and the total time."""
    changed = [step.name for step in progress.steps if step.changed]
    if not changed:
        return f"provision {where}: nothing changed, the server was already provisioned ({progress.elapsed:.1f} s)"
    what = f"{len(changed)} of {len(progress.steps)} steps changed the server ({', '.join(changed)})"
    return f"provision {where}: {what} in {progress.elapsed:.1f} s"


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
