"""Provision's steps on one host, whatever its roles: packages, users, directories, files compared then uploaded,
supervisord, nginx, the certificate and the backup timer. Each returns whether it changed the server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import PurePosixPath

from fabric import Connection

from deploy import tls
from deploy.commands import updates
from deploy.config import DeployConfig, has_app
from deploy.errors import DeployError
from deploy.on_server import script
from deploy.provision.facts import FACTS_SCRIPT, check_facts, parse_facts
from deploy.render.cluster_tls import is_ca_host, uses_cluster_tls
from deploy.render.nginx import ACME_WEBROOT, CERT_DIR, NGINX_FACTS_SCRIPT, NginxFacts, parse_nginx_facts
from deploy.render.supervisord import SUPERVISORCTL_DEFAULT, render_supervisorctl_default, render_supervisord_main
from deploy.render.systemd import (
    BACKUP_SERVICE,
    BACKUP_TIMER,
    CERTBOT_DROPIN,
    EGRESS_TABLE,
    EGRESS_UNIT,
    UNIT,
    WATCHDOG_ETC,
    WATCHDOG_SERVICE,
    WATCHDOG_TIMER,
    acme_ca_path,
    backup_helper,
    egress_rules_path,
    render_backup_units,
    render_certbot_dropin,
    render_egress_firewall,
    render_egress_unit,
    render_unit,
    render_watchdog_config,
    render_watchdog_units,
    watchdog_config_path,
    watchdog_script,
)
from deploy.ssh import Server, connect, sh

TLS_PACKAGES = ("certbot", "openssl")  # webroot-mode ACME client, and the certificate's reader
SYSTEMD_UNITS = PurePosixPath("/etc/systemd/system")
UNIT_PATH = SYSTEMD_UNITS / UNIT
NGINX_SITE = PurePosixPath("/etc/nginx/sites-available/prayer-room")
NGINX_ENABLED = PurePosixPath("/etc/nginx/sites-enabled/prayer-room")
NGINX_DEFAULT = PurePosixPath("/etc/nginx/sites-enabled/default")


def connect_for_provision(conn: Connection, config: DeployConfig) -> Server:
    """Open and check the server (reachable, key accepted, root or passwordless sudo, systemd, apt, python3).

    Only reads: a refused server is left exactly as it was.
    """
    # NOTE: deploy.ssh.connect also insists the app user exists, which provision is about to create:
    # check against root (always there) and hand back a Server for the configured user.
    checked = connect(conn, replace(config, user="root", require_systemd=True))
    server = Server(conn, config, checked.is_root, checked.sudo_password, app_home=str(config.layout.root))
    facts = parse_facts(server.root(FACTS_SCRIPT, what="inspecting the server").stdout)
    check_facts(facts, server.name)
    return server


def holds_certificate(config: DeployConfig) -> bool:
    """Whether this host holds the certificate for `domain`: the balancer, or the web host of a site without one."""
    front = config.runs("balancer") or (config.runs("web") and not config.role_hosts("balancer"))
    return bool(config.domain) and front


def packages_for(config: DeployConfig) -> tuple[str, ...]:
    """What the host's roles need installed: the app's Python and supervisor, PostgreSQL and Redis, nftables (an app
    host's link-local block, the firewall of a db host of several hosts), nginx for web and balancer, certbot where
    the certificate is; an app host whose PostgreSQL is elsewhere gets its client (the primary's backups run pg_dump
    against the db host); on a cluster, openssl where the cluster CA and certificates are made."""
    app, db = has_app(config), config.runs("db")
    wanted = [
        *(("python3-venv",) if app else ()),
        *(("postgresql", "redis-server") if db else ()),
        *(("nginx",) if config.runs("web") or config.runs("balancer") else ()),
        *(("supervisor",) if app else ()),
        *(("postgresql-client",) if app and not db else ()),
        *(("nftables",) if app or (db and config.multi_host) else ()),
        *(("pgbackrest",) if db and config.backup_repository else ()),
        *(TLS_PACKAGES if holds_certificate(config) else ()),
    ]
    if uses_cluster_tls(config) and (db or config.runs("web") or is_ca_host(config)) and "openssl" not in wanted:
        wanted.append("openssl")  # the cluster CA (its host) and each host's certificate (db and web hosts)
    return tuple(wanted)


def services_for(config: DeployConfig) -> tuple[str, ...]:
    """The installed services that must be enabled and running."""
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
        install = f"{updates.APT} install --no-install-recommends -o Dpkg::Options::=--force-confold {sh(*missing)}"
        server.root(
            f"{updates.apt_update()} && {install}",
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


def directories(config: DeployConfig) -> list[tuple[PurePosixPath, str, str]]:
    """(path, owner, mode) of every directory provision creates: all root's, read-only to the app user; nginx must
    traverse down to releases/<id>/static. The socket's directory is the unit's RuntimeDirectory."""
    layout = config.layout
    acme = [(ACME_WEBROOT, "root", "755")] if config.domain else []
    return [
        *acme,
        (layout.root, "root", "755"),
        (layout.releases, "root", "755"),
        (layout.venvs, "root", "755"),
        (layout.env_file.parent, "root", "755"),
        (layout.logs, "root", "750"),
        (layout.etc, "root", "755"),
    ]


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


def wait_for_socket(server: Server, socket: PurePosixPath, timeout: int = 20) -> None:
    """Wait until supervisord answers on its socket; raise with the unit's last log lines if it does not."""
    probe = f"for i in $(seq {timeout * 5}); do test -S {sh(socket)} && exit 0; sleep 0.2; done; exit 1"
    if server.root(probe, what="waiting for supervisord", warn=True).exited == 0:
        return
    log = server.root(sh("journalctl", "-u", UNIT, "-n", "5", "--no-pager"), what="reading the log", warn=True)
    raise DeployError(f"supervisord did not start on {server.name}: {log.stdout.strip()[-800:]}")


def ensure_backup_timer(server: Server) -> bool:
    """The daily backup: its helper, service and timer in place, the timer enabled and waiting."""
    config = server.config
    service, timer = render_backup_units(config)
    # The service may write its directory only (ProtectSystem=strict): it must exist before its first run.
    backups = config.layout.backups
    server.root(sh("install", "-d", "-o", "root", "-g", "root", "-m", "700", backups), what=f"making {backups}")
    changed = sync_file(server, backup_helper(config), script("root_helper"), owner="root", mode="0644")
    units_changed = sync_file(server, SYSTEMD_UNITS / BACKUP_SERVICE, service, owner="root", mode="0644")
    units_changed |= sync_file(server, SYSTEMD_UNITS / BACKUP_TIMER, timer, owner="root", mode="0644")
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


def read_nginx_facts(server: Server) -> NginxFacts:
    """The installed nginx's version."""
    return parse_nginx_facts(server.root(NGINX_FACTS_SCRIPT, what="reading nginx's version").stdout)


def ensure_nginx(server: Server, site: str, *, reload: bool = False) -> bool:
    """The nginx site (a web host's or the balancer's), enabled in place of Debian's default one, checked with
    `nginx -t` before a reload (graceful: old workers finish their requests).

    A config nginx refuses is taken back (the site as it was, enabled as it was) before the error is raised, so a
    re-run tries again instead of finding the files in place and nginx never reloaded. `reload`: the files it names
    changed (a new cluster certificate), so it reloads even when the site did not.
    """
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
    if changed or reload:
        server.root("systemctl reload-or-restart nginx", what="reloading nginx")
    return changed


def ensure_certificate(server: Server, site: str) -> tuple[bool, str]:
    """A certificate for the domain (certbot, webroot mode: nginx already answers the challenge on port 80), then
    `site`, the HTTPS one; certbot.timer renews it, trusting acme_ca_bundle if given. A fitting one is kept."""
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
    changed |= ensure_nginx(server, site)
    changed |= tls.ensure_renewal_timer(server)
    return changed, note


def ensure_watchdog(server: Server) -> bool:
    """The watchdog: its script and config (root's), its sandboxed service and the every-minute timer, enabled and
    waiting. A changed config (deploy.toml's notify) is in place for the next run."""
    config = server.config
    certificate = str(CERT_DIR / "cert.pem") if holds_certificate(config) else ""
    service, timer = render_watchdog_units(config)
    changed = ensure_directories(server, [(WATCHDOG_ETC, "root", "700")])
    changed |= sync_file(server, watchdog_script(config), script("watchdog"), owner="root", mode="0644")
    changed |= sync_file(
        server, watchdog_config_path(config), render_watchdog_config(config, certificate), owner="root", mode="0600"
    )
    units_changed = sync_file(server, SYSTEMD_UNITS / WATCHDOG_SERVICE, service, owner="root", mode="0644")
    units_changed |= sync_file(server, SYSTEMD_UNITS / WATCHDOG_TIMER, timer, owner="root", mode="0644")
    if units_changed:
        server.root("systemctl daemon-reload", what="reloading systemd")
    state = server.root(
        f"systemctl is-enabled {WATCHDOG_TIMER}; systemctl is-active {WATCHDOG_TIMER}",
        what="checking the watchdog timer",
        warn=True,
    ).stdout.split()
    if state[:2] != ["enabled", "active"]:
        server.root(sh("systemctl", "enable", "--now", WATCHDOG_TIMER), what=f"starting {WATCHDOG_TIMER}")
        changed = True
    elif units_changed:
        server.root(sh("systemctl", "restart", WATCHDOG_TIMER), what=f"restarting {WATCHDOG_TIMER}")
    return changed or units_changed


def ensure_nft_table(
    server: Server, rules_path: PurePosixPath, rules: str, unit_name: str, unit: str, table: str, what: str
) -> bool:
    """An nftables table of the kit's own: its rules file and its unit (which loads it at boot) in place, the unit
    enabled, and the table loaded now (reloaded when either changed)."""
    changed = sync_file(server, rules_path, rules, owner="root", mode="0644")
    unit_changed = sync_file(server, SYSTEMD_UNITS / unit_name, unit, owner="root", mode="0644")
    if unit_changed:
        server.root("systemctl daemon-reload", what="reloading systemd")
    state = server.root(
        f"systemctl is-enabled {unit_name}; systemctl is-active {unit_name};"
        f" nft list table inet {table} >/dev/null 2>&1 && echo loaded",
        what=f"checking {what}",
        warn=True,
    ).stdout.split()
    if state[:1] != ["enabled"]:
        server.root(sh("systemctl", "enable", unit_name), what=f"enabling {unit_name}")
        changed = True
    if state[1:3] != ["active", "loaded"]:
        server.root(sh("systemctl", "restart", unit_name), what=f"loading {what} ({unit_name})")
        changed = True
    elif changed or unit_changed:
        server.root(sh("systemctl", "reload", unit_name), what=f"reloading {what} ({unit_name})")
    return changed or unit_changed


def ensure_egress_firewall(server: Server) -> bool:
    """An app host's own nftables table: the app user and the build user reach no link-local address."""
    config = server.config
    return ensure_nft_table(
        server, egress_rules_path(config), render_egress_firewall(config), EGRESS_UNIT, render_egress_unit(config),
        EGRESS_TABLE, "the link-local block",
    )  # fmt: skip
