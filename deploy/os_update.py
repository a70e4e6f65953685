"""`fab os-update [--reboot]`: the Debian packages of each host upgraded, the host rebooted when an update asks for it
(/var/run/reboot-required) or --reboot says so, and the site verified on it before the next host is touched.

One path over the site's hosts, in `update_order`: the web hosts one at a time (on a cluster each is drained at the
balancer first, deploy/balancer.py, and put back once verified: the others serve meanwhile), the other app hosts,
the balancer, the db host last. The maintenance page is up while a host reboots that no other host can stand in for:
the only web host (a single server), or the db host (on every web host). NOTE: the page is served by nginx, which is
down itself while its host reboots: a single server answers 503 until shutdown stops nginx, then nothing until nginx
is back, then 503 until the programs are verified.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

from fabric import Connection

from deploy import balancer as balancer_module
from deploy import history, maintenance, verify
from deploy.commands import updates as commands
from deploy.config import DeployConfig, address_of
from deploy.errors import DeployError
from deploy.processes import wait_running
from deploy.progress import Progress
from deploy.site import Member, Site, rollout_order
from deploy.ssh import Server, connect, sh

# Seconds a host has, from the reboot, to answer over SSH with a new boot id.
BOOT_TIMEOUT = 600
# Seconds PostgreSQL, Redis and nginx have to be active again after a reboot.
SERVICES_TIMEOUT = 120
# A web host's nginx serves the site on this port (the balancer comes in over TLS, WEB_TLS_PORT; loopback here).
NGINX_PORT = 80


def update_order(config: DeployConfig, hosts: Sequence[str]) -> list[str]:
    """The hosts in the order they are updated: web hosts, then the other app hosts (as a deploy rolls out), the
    balancer, and the db host last (everything else depends on it)."""
    db = [h for h in hosts if "db" in config.roles_of(h)]
    app = [h for h in rollout_order(config, hosts) if h not in db]
    return app + [h for h in hosts if h not in app and h not in db] + db


@dataclass
class Target:
    """One host being updated: its session (an app host's member, or a root session on a db or balancer host)."""

    name: str
    server: Server
    member: Member | None

    @property
    def label(self) -> str:
        return address_of(self.name)

    @property
    def progress(self) -> Progress | None:
        return self.member.progress if self.member else None


def os_update(site: Site, *, reboot: bool = False, boot_timeout: int = BOOT_TIMEOUT) -> str:
    """Upgrade, reboot when needed (or `reboot`), verify: host by host in `update_order`, under the deploy lock of
    every app host; recorded in the history and announced. A host that fails (or does not come back) stops the
    command there: the hosts after it are left untouched, and the error names it."""
    config = site.config
    order = update_order(config, site.hosts)
    progress = Progress(f"os-update on {site.name}")
    apps = [h for h in order if h in site.app_hosts]
    if apps:
        site.connect_step(progress, apps)
    else:
        site.progress = progress
    targets = [_target(site, name) for name in order]
    outcomes: list[str] = []
    detail = "--reboot" if reboot else ""
    with (
        history.recorded(site, "os-update", detail=detail) as record,
        site.locked("os-update") if apps else nullcontext(),
    ):
        if apps:
            site.read_states()  # under the lock: the release live now, and where beat's log ends
            primary = site.members.get(config.primary)
            record["release"] = primary.state.current if primary and primary.state else None
        front = _balancer(site, targets)
        for number, target in enumerate(targets):
            title = f"update {target.label} ({', '.join(sorted(config.roles_of(target.name)))})"
            try:
                with progress.step(title) if len(targets) > 1 else nullcontext():
                    outcomes.append(
                        _update_host(site, target, reboot=reboot, boot_timeout=boot_timeout, balancer=front)
                    )
            except DeployError as exc:
                left = [t.label for t in targets[number + 1 :]]
                untouched = f"; left untouched: {', '.join(left)}" if left else ""
                done = f"; updated before it: {', '.join(t.label for t in targets[:number])}" if number else ""
                raise DeployError(f"os-update stopped at {target.label}: {exc}{untouched}{done}") from exc
        record["detail"] = " ".join(filter(None, [detail, f"{len(outcomes)} host(s) updated"]))
    return progress.summary("; ".join(outcomes))


def _balancer(site: Site, targets: Sequence[Target]) -> Target | None:
    """The balancer that drains each web host while it is updated: on a site with one and several web hosts (also
    when -H names a web host alone: the balancer is reached too)."""
    config = site.config
    balancers = config.role_hosts("balancer")
    if not balancers or len(config.role_hosts("web")) < 2:
        return None
    name = balancers[0]
    known = next((t for t in targets if t.name == name), None)
    if known:
        return known
    conn = Connection(name, config=site.conns[0].config, connect_timeout=site.conns[0].connect_timeout)
    return Target(name, connect(conn, replace(config.for_host(name), user="root")), None)


def _target(site: Site, name: str) -> Target:
    member = site.members.get(name)
    if member:
        return Target(name, member.server, member)
    config = replace(site.config.for_host(name), user="root")  # no app user on a db or balancer host
    return Target(name, connect(site.by_address[address_of(name)], config), None)


def _step(site: Site, target: Target, name: str):
    return (target.progress or site.progress).step(name)


def _update_host(site: Site, target: Target, *, reboot: bool, boot_timeout: int, balancer: Target | None) -> str:
    """One host: a web host behind the balancer drained first; apt-get upgrade, then (when needed) the reboot behind
    the maintenance page, then the checks; the drained web host put back."""
    if balancer is None or target is balancer or not site.config.for_host(target.name).runs("web"):
        return _upgrade_and_reboot(site, target, reboot=reboot, boot_timeout=boot_timeout)
    with _step(site, target, f"drain {target.label} at the balancer {balancer.label}") as outcome:
        started = time.monotonic()
        outcome.changed, outcome.note = balancer_module.drain(balancer.server, target.name)
        drained = time.monotonic() - started
    try:
        what = _upgrade_and_reboot(site, target, reboot=reboot, boot_timeout=boot_timeout)
        if target.member and target.member.state and target.member.state.current:
            with _step(site, target, f"verify {target.label}: /health/ through its own nginx"):
                _verify_nginx(target.member)
    except DeployError as exc:
        raise DeployError(
            f"{exc}; the balancer {balancer.label} keeps it drained (out of its upstream) until an os-update "
            "verifies it (or `fab provision`)"
        ) from exc
    with _step(site, target, f"put {target.label} back into the balancer {balancer.label}") as outcome:
        outcome.changed = balancer_module.put_back(balancer.server)
    return f"{what}; drained at the balancer ({drained:.1f} s) meanwhile, then put back"


def _verify_nginx(member: Member) -> None:
    """/health/ through the web host's own nginx (the way the balancer's requests go on to its web programs) answers
    200 naming the live release; skipped while the operator's maintenance page is up (nginx answers 503 then)."""
    server, state = member.server, member.state
    flag = server.config.layout.maintenance_flag
    if server.root(sh("test", "-e", flag), what="checking the maintenance flag", warn=True).exited == 0:
        return
    release_dir = server.config.layout.releases / state.current
    verify.check_web(server, release_dir, state.current, NGINX_PORT, verify.health_host(state.env_values(server)))


def _upgrade_and_reboot(site: Site, target: Target, *, reboot: bool, boot_timeout: int) -> str:
    """apt-get upgrade, then (when needed) the reboot behind the maintenance page, then the checks."""
    server = target.server
    with _step(site, target, "upgrade the Debian packages (apt-get upgrade)") as outcome:
        out = server.root(commands.upgrade(), what="upgrading packages (apt-get upgrade)", timeout=3600).stdout
        counts = re.search(r"^(\d+) upgraded, (\d+) newly installed", out, re.M)
        upgraded = int(counts.group(1)) + int(counts.group(2)) if counts else 0
        outcome.changed, outcome.note = bool(upgraded), f"{upgraded} package(s) upgraded"
    asked = server.root(sh("test", "-f", commands.REBOOT_REQUIRED), what="checking for a pending reboot", warn=True)
    needed = asked.exited == 0
    what = f"{target.label}: {upgraded} package(s) upgraded"
    if not (needed or reboot):
        _verify(site, target, rebooted=False)
        return f"{what}, no reboot needed, verified"
    pages = _page_hosts(site, target)
    why = f"reboot of {target.label}"
    for member in pages:
        with member.progress.step(f"maintenance page on ({why})"):
            maintenance.turn_on(member.server)
    started = time.monotonic()
    try:
        with site.offline(server):
            down = _reboot(site, target, boot_timeout)
        _verify(site, target, rebooted=True)
    except DeployError as exc:
        if not pages:
            raise
        flag = site.config.layout.maintenance_flag
        raise DeployError(
            f"{exc}; the maintenance page stays on ({', '.join(m.label for m in pages)}): once the site is back, "
            f"remove {flag} there"
        ) from exc
    for member in pages:
        maintenance.turn_off(member.server)
    window = time.monotonic() - started
    if pages:
        site.progress.record("maintenance window (the site answered 503, or nothing while nginx was down)", window)
        return f"{what}, rebooted (down {down:.0f} s; maintenance page {window:.0f} s), verified"
    return f"{what}, rebooted (down {down:.0f} s), verified"


def _page_hosts(site: Site, target: Target) -> list[Member]:
    """The web hosts that show the maintenance page while `target` reboots: every one when it holds the database,
    itself when it is the only web host; none when other web hosts (behind the balancer) serve meanwhile."""
    config = site.config
    web = [m for m in site.order if m.server.config.runs("web")]
    if "db" in config.roles_of(target.name):
        return web
    if target.member in web and len(config.role_hosts("web")) == 1:
        return [target.member]
    return []


def boot_id(server: Server) -> str:
    return server.root(commands.BOOT_ID, what="reading the boot id").stdout.strip()


def _reboot(site: Site, target: Target, timeout: int) -> float:
    """Reboot the host and wait until it answers over SSH with a new boot id; the seconds it was away."""
    server = target.server
    with _step(site, target, f"reboot {target.label} and wait for SSH") as outcome:
        before = boot_id(server)
        started = time.monotonic()
        try:
            server.root(commands.reboot(), what="rebooting", warn=True)
        except DeployError:
            pass  # the session may end before the command's answer: the new boot id below is what counts
        deadline = started + timeout
        while True:
            server.conn.close()
            try:
                connect(server.conn, server.config)
                if boot_id(server) != before:
                    break
            except DeployError:
                pass
            if time.monotonic() > deadline:
                server.conn.close()
                raise DeployError(
                    f"{server.name} did not come back within {timeout} s of its reboot (no SSH login with a new "
                    "boot id); see its console"
                )
            time.sleep(1)
        down = time.monotonic() - started
        outcome.changed, outcome.note = True, f"back after {down:.0f} s"
    return down


def _wait_services(server: Server, units: Sequence[str]) -> None:
    """PostgreSQL, Redis and nginx (those of the host's roles) active again after a reboot."""
    if not units:
        return
    probe = (
        f"for i in $(seq {SERVICES_TIMEOUT}); do systemctl is-active -q {sh(*units)} && exit 0; sleep 1; done; "
        f"systemctl is-active {sh(*units)}; exit 1"
    )
    result = server.root(probe, what="waiting for the services", warn=True, timeout=SERVICES_TIMEOUT + 30)
    if result.exited != 0:
        states = ", ".join(f"{u} {s}" for u, s in zip(units, result.stdout.split(), strict=False))
        raise DeployError(f"not active {SERVICES_TIMEOUT} s after the reboot: {states}")


def _verify(site: Site, target: Target, *, rebooted: bool) -> None:
    """The host's services active; then the live release's programs verified, on this host (an app host) or, after
    the db host, on every app host: running, /health/ on each web port naming the release, a ping task through a
    worker, and beat (restarted by the reboot) with the leader lock decided."""
    config = site.config.for_host(target.name)
    units = [
        *(("postgresql", "redis-server") if config.runs("db") else ()),
        *(("nginx",) if config.runs("web") or config.runs("balancer") else ()),
    ]
    with _step(site, target, f"verify {target.label}: services, programs, /health/, a ping task"):
        _wait_services(target.server, units)
        members = site.order if "db" in config.roles_of(target.name) else [target.member] if target.member else []
        for member in members:
            _verify_programs(member, beat_restarted=rebooted and member is target.member)


def _verify_programs(member: Member, *, beat_restarted: bool) -> None:
    server, state = member.server, member.state
    if state is None or not state.current:
        return  # provisioned, never deployed: nothing runs
    config = server.config
    release_dir = config.layout.releases / state.current
    programs = member.programs
    wait_running(server, programs.all, timeout=config.health_timeout)
    health = verify.health_host(state.env_values(server))
    for _, port in programs.web:
        verify.check_web(server, release_dir, state.current, port, health)
    if config.runs("worker"):
        verify.check_worker(server, release_dir, state.current, state.live_programs or "")
    if config.runs("beat") and beat_restarted:
        verify.check_beat(server, state.beat_log_size, release_dir)
