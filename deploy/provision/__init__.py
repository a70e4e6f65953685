"""`fab provision`: take fresh Debian 13 or 12 servers to a site `fab deploy` can fill; a re-run changes
nothing.

One path for every site: each host gets what its roles need, the db host first (the others need it), then the
others in parallel, each one's lines behind its name. A single server is a site of one host holding web, worker,
beat and db. Every step first reads what is there and only acts on a difference, so each reports whether it
changed anything; what the files say is rendered by deploy.render (pure).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import TextIO

from fabric import Connection

from deploy import archive, tls
from deploy.config import DeployConfig, address_of, has_app
from deploy.errors import DeployError
from deploy.lock import DeployLock
from deploy.progress import PrefixedLines, Progress, in_parallel
from deploy.provision.cluster_tls import ClusterCA, ensure_ca_certificate, ensure_server_certificate
from deploy.provision.db_host import (
    ensure_database,
    ensure_firewall,
    ensure_postgres_network,
    ensure_redis,
)
from deploy.provision.env_file import ensure_env_file, site_env_values
from deploy.provision.host import (
    connect_for_provision,
    ensure_app_user,
    ensure_backup_timer,
    ensure_certificate,
    ensure_directories,
    ensure_egress_firewall,
    ensure_nginx,
    ensure_supervisord,
    ensure_watchdog,
    holds_certificate,
    install_packages,
    read_nginx_facts,
)
from deploy.provision.updates import ensure_security_updates
from deploy.render.cluster_tls import (
    DB_CERTIFICATE,
    WEB_CERTIFICATE,
    WEB_TLS_NAME,
    ca_host,
    is_ca_host,
    uses_cluster_tls,
)
from deploy.render.nginx import ACME_WEBROOT, render_balancer_site, render_nginx_site
from deploy.ssh import Server


class Member:
    """One host of the site being provisioned: its connection, bound config, progress and outcome."""

    def __init__(self, conn: Connection, config: DeployConfig, out: TextIO, lock: threading.Lock) -> None:
        self.conn, self.config = conn, config
        self.name = f"{conn.user}@{conn.host}" + (f":{conn.port}" if conn.port != 22 else "")
        # A site of several hosts: each host's lines behind its name.
        stream = PrefixedLines(f"[{self.name}] ", out, lock) if config.multi_host else out
        self.progress = Progress(f"provision {self.name}", out=stream)
        self.server: Server | None = None
        self.error: str = ""
        # The cluster certificates this run gave the host (db, web): the services serving them restart or reload.
        self.new_certificates: set[str] = set()

    def step(self, name: str, action: Callable[[], bool | tuple[bool, str]]) -> None:
        with self.progress.step(name) as outcome:
            result = action()
            outcome.changed, outcome.note = result if isinstance(result, tuple) else (result, "")

    def run(self, phase: Callable[[Member], None]) -> None:
        """Run `phase` unless this host already failed. On a site of several hosts a failure is kept, naming the
        step it happened in, so the others finish; a site of one host's is raised as it is."""
        if self.error:
            return
        try:
            phase(self)
        except DeployError as exc:
            if not self.config.multi_host:
                raise
            failed = [step.name for step in self.progress.steps if not step.ok]
            self.error = f"{self.name} ({failed[-1] if failed else 'connecting'}): {exc}"
            self.progress.say(f"FAILED: {exc}")

    @property
    def is_primary(self) -> bool:
        return self.config.hosts[0] == self.config.primary

    @property
    def changed(self) -> bool:
        return any(step.changed for step in self.progress.steps)

    @property
    def seconds(self) -> float:
        """The time its own steps took (the db host's before the others', then each one's beside theirs)."""
        return sum(step.seconds for step in self.progress.steps)


def _connect(member: Member) -> None:
    member.server = connect_for_provision(member.conn, member.config)


def _host_steps(values: dict[str, str], ca: ClusterCA | None, lock_held: bool = False) -> Callable[[Member], None]:
    """Every host's part, for its roles: on a cluster the CA's certificate (the db host creates the CA first) and the
    db host's own certificate; an app host's layout and env file, then (under the deploy lock, which lives in the
    app directory: no deploy, rollback or restart runs meanwhile; `lock_held`: the caller holds it) its services."""

    def phase(member: Member) -> None:
        server, config = member.server, member.config
        member.step("packages", lambda: install_packages(server))
        member.step("security updates", lambda: ensure_security_updates(server))
        if ca is not None:
            if is_ca_host(config):
                member.step("cluster CA", lambda: ca.ensure() | ensure_ca_certificate(server, ca))
            else:
                member.step("cluster CA", lambda: ensure_ca_certificate(server, ca))
        if ca is not None and config.runs("web") and config.role_hosts("balancer"):

            def web_certificate() -> bool:
                address = address_of(config.hosts[0])
                if ensure_server_certificate(server, ca, WEB_CERTIFICATE, address, names=(WEB_TLS_NAME,)):
                    member.new_certificates.add(WEB_CERTIFICATE)
                return WEB_CERTIFICATE in member.new_certificates

            # Its nginx serves the balancer with it (the nginx step reloads when it changed).
            member.step("web certificate", web_certificate)
        if config.runs("db") and config.multi_host:

            def db_certificate() -> bool:
                groups = ("postgres", "redis")  # each reads its own copy of the key
                if ensure_server_certificate(server, ca, DB_CERTIFICATE, config.db_address, groups=groups):
                    member.new_certificates.add(DB_CERTIFICATE)
                return DB_CERTIFICATE in member.new_certificates

            member.step("db certificate", db_certificate)
            # The firewall first: PostgreSQL and Redis never listen on the db address unfiltered.
            member.step("firewall", lambda: ensure_firewall(server))
            new_certificate = DB_CERTIFICATE in member.new_certificates
            member.step("postgresql", lambda: ensure_postgres_network(server, values["DATABASE_URL"], new_certificate))
        if not has_app(config):
            _services(member, values)
            member.step("watchdog", lambda: ensure_watchdog(server))
            return
        member.step("app user", lambda: ensure_app_user(server))
        member.step("directories", lambda: ensure_directories(server))
        member.step("link-local block", lambda: ensure_egress_firewall(server))
        with nullcontext() if lock_held else DeployLock(server, "provision").held():
            member.step("env file", lambda: ensure_env_file(server, values))
            _services(member, values)
            if member.is_primary:
                member.step("backup timer", lambda: ensure_backup_timer(server))
        member.step("watchdog", lambda: ensure_watchdog(server))

    return phase


def _services(member: Member, values: dict[str, str]) -> None:
    """What the host serves for its roles: the db host's PostgreSQL and Redis, the app's supervisord, nginx."""
    server, config = member.server, member.config
    if config.runs("db"):
        member.step("database", lambda: ensure_database(server, values["DATABASE_URL"]))
        member.step("redis", lambda: ensure_redis(server, values, DB_CERTIFICATE in member.new_certificates))
        if config.backup_repository:
            member.step("archive", lambda: archive.ensure_archive(server, member.progress.say))
    if has_app(config):
        member.step("supervisord", lambda: ensure_supervisord(server))
    if config.runs("web") or config.runs("balancer"):
        _front_steps(member)


def _front_steps(member: Member) -> None:
    """A web host's nginx site, or the balancer's; the host holding the certificate for `domain` gets it (the ACME
    challenge first, on plain HTTP), then its HTTPS site."""
    server, config = member.server, member.config
    balancer = config.runs("balancer")

    def site(secure: bool) -> str:
        nginx = read_nginx_facts(server)  # installed by the packages step: its version decides how HTTP/2 is on
        if balancer:
            return render_balancer_site(config, nginx=nginx, tls=secure)
        return render_nginx_site(config, member.conn.host, nginx=nginx, tls=secure)

    if balancer and config.domain:
        member.step("acme webroot", lambda: ensure_directories(server, [(ACME_WEBROOT, "root", "755")]))
    # Without a certificate yet, the site starts on plain HTTP: the ACME challenge needs it.
    holder = holds_certificate(config)
    name = "balancer" if balancer else "nginx"
    reload = WEB_CERTIFICATE in member.new_certificates
    member.step(name, lambda: ensure_nginx(server, site(holder and tls.has_fitting_certificate(server)), reload=reload))
    if holder:
        member.step("certificate", lambda: ensure_certificate(server, site(True)))


def _prepare_primary_env_file(primary: Member) -> None:
    """Without a db host and its URLs: the primary gets its app user, layout and env file (secrets and all but the
    service URLs), so the operator has a file to add them to."""
    server = primary.server
    primary.step("app user", lambda: ensure_app_user(server))
    primary.step("directories", lambda: ensure_directories(server))
    primary.step("env file", lambda: ensure_env_file(server, {}))


def summary(where: str, progress: Progress, seconds: float | None = None) -> str:
    """The closing line: how many steps changed the server (none on a re-run), and the total time (or `seconds`)."""
    changed = [step.name for step in progress.steps if step.changed]
    seconds = progress.elapsed if seconds is None else seconds
    if not changed:
        return f"provision {where}: nothing changed, the server was already provisioned ({seconds:.1f} s)"
    what = f"{len(changed)} of {len(progress.steps)} steps changed the server ({', '.join(changed)})"
    return f"provision {where}: {what} in {seconds:.1f} s"


def site_summary(config: DeployConfig, members: list[Member], elapsed: float) -> str:
    """A site of one host: its summary line. Of several: one line per host (what changed, or nothing), then the
    site's total."""
    if not config.multi_host:
        return "\n".join(summary(member.name, member.progress, elapsed) for member in members)
    lines = [
        f"FAILED {member.error}" if member.error else summary(member.name, member.progress, member.seconds)
        for member in members
    ]
    changed = [member.name for member in members if member.changed]
    if not changed:
        total = f"nothing changed on its {len(members)} hosts, the cluster was already provisioned ({elapsed:.1f} s)"
    else:
        total = f"{len(changed)} of {len(members)} hosts changed in {elapsed:.1f} s"
    return "\n".join([*lines, f"provision cluster {config.name}: {total}"])


def provision(
    conns: list[Connection],
    config: DeployConfig,
    *,
    out: TextIO | None = None,
    on_primary: Callable[[Server], None] | None = None,
    lock_held: bool = False,
) -> str:
    """Provision each host of the site for its roles: the db host first (the others need it), then the others in
    parallel. Returns the summary. On a site of several hosts a failure raises DeployError naming the host and the
    step, after the other hosts have finished (a re-run goes on from where each stopped). `on_primary` gets the
    primary once it is connected and checked. `lock_held`: the caller holds the deploy lock of every app host (`fab
    os-update --release` provisions under its own)."""
    started = time.monotonic()
    out = out or sys.stdout
    lock = threading.Lock()
    members = [Member(conn, config.at(conn.host), out, lock) for conn in conns]
    primary = next((member for member in members if member.is_primary), None)
    if primary is None:  # provisioning only some hosts: the env values still come from the primary
        template = conns[0]
        conn = Connection(config.primary, config=template.config, connect_timeout=template.connect_timeout)
        primary = Member(conn, config.for_host(config.primary), out, lock)
    everyone = list(dict.fromkeys([*members, primary]))
    in_parallel(lambda member: member.run(_connect), everyone, name=lambda member: member.name)
    if on_primary and primary.server:
        on_primary(primary.server)
    _raise_failures(config, everyone, started, out)

    try:
        values = site_env_values(primary.server, primary.name)
    except DeployError:
        if not config.db_address and primary in members:
            primary.run(_prepare_primary_env_file)
        raise
    ca = _cluster_ca(config, everyone, members, out, lock)
    phase = _host_steps(values, ca, lock_held)
    # The db host first, and the CA host (the same one, or the primary without a db host): the others need both.
    first = [member for member in members if member.config.runs("db") or is_ca_host(member.config)]
    for member in first:
        member.run(phase)
    _raise_failures(config, members, started, out)
    others = [member for member in members if member not in first]
    in_parallel(lambda member: member.run(phase), others, name=lambda member: member.name)
    _raise_failures(config, members, started, out)
    return site_summary(config, members, time.monotonic() - started)


def _cluster_ca(
    config: DeployConfig, everyone: list[Member], members: list[Member], out: TextIO, lock: threading.Lock
) -> ClusterCA | None:
    """The CA host's CA on a site of several hosts (connected here when provision was narrowed to other hosts), else
    None. The CA host is the db host, or the primary on a site without one."""
    if not uses_cluster_tls(config):
        return None
    holder = ca_host(config)
    member = next((member for member in everyone if member.config.hosts[0] == holder), None)
    if member is None:
        template = members[0].conn
        conn = Connection(holder, config=template.config, connect_timeout=template.connect_timeout)
        member = Member(conn, config.for_host(holder), out, lock)
        member.run(_connect)
        _raise_failures(config, [member], time.monotonic(), out)
    return ClusterCA(member.server)


def _raise_failures(config: DeployConfig, members: list[Member], started: float, out: TextIO) -> None:
    failed = [member for member in members if member.error]
    if failed:
        print(site_summary(config, members, time.monotonic() - started), file=out, flush=True)
        raise DeployError(
            "provision failed on " + "; ".join(member.error for member in failed) + " -- the steps done stay done: "
            "fix that and run provision again."
        )
