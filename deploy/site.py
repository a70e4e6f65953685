"""A site: the hosts of one environment a command acts on (one host is a site of one), connected and checked;
its rollout order, its primary, the deploy lock on every member kept alive by one heartbeat, and the maintenance
window on every web host."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

from fabric import Connection

from deploy import host
from deploy.config import APP_ROLES, ROLES, DeployConfig, address_of, has_app
from deploy.errors import DeployError
from deploy.lock import DeployLock
from deploy.maintenance import window as maintenance_window
from deploy.processes import Programs
from deploy.progress import PrefixedLines, Progress, in_parallel
from deploy.ssh import Server, connect, sh
from deploy.state import ServerState, read_state

R = TypeVar("R")


def rollout_order(config: DeployConfig, hosts: Sequence[str]) -> list[str]:
    """The app hosts in switch order: web hosts (one at a time), then the other worker hosts, then beat hosts."""
    order: list[str] = []
    for role in APP_ROLES:
        order += [h for h in config.role_hosts(role) if h in hosts and h not in order]
    return order


@dataclass(eq=False)
class Member:
    """One app host of the site during a command: its checked connection, its state and its own progress lines."""

    host: str
    server: Server
    progress: Progress
    state: ServerState | None = None
    programs_text: str = ""

    @property
    def label(self) -> str:
        return self.host.rpartition("@")[2]

    @property
    def roles(self) -> str:
        return ",".join(role for role in ROLES if self.server.config.runs(role))

    @property
    def programs(self) -> Programs:
        return Programs.from_config(self.server.config)


class LockKeeper:
    """Refreshes every held lock from a thread while a command runs, so no step (a virtualenv build, a long
    migration on another host) outlives the lock's expiry; a lock lost meanwhile stops the command at its next
    step."""

    def __init__(self, locks: list[DeployLock], interval: float) -> None:
        self.locks, self.interval = locks, interval
        self.failure: DeployError | None = None
        # The hosts rebooting (fab os-update): their locks wait, on their disks, until they answer again.
        self.offline: set[str] = set()
        self.refreshing = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="deploy-lock-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            for lock in self.locks:
                try:
                    with self.refreshing:
                        if lock.server.name not in self.offline:
                            lock.refresh()
                except DeployError as exc:
                    self.failure = exc
                    return

    def check(self) -> None:
        """Raise the heartbeat's failure (a lost lock) in the command's thread."""
        if self.failure is not None:
            raise self.failure

    def __enter__(self) -> LockKeeper:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join()


class Site:
    """The hosts of `config` that `conns` reach (every host of the site, or those -H names), narrowed to the
    hosts of `role`; `connect` opens and checks its app hosts."""

    def __init__(self, config: DeployConfig, conns: Sequence[Connection], role: str | None = None) -> None:
        if role is not None and role not in APP_ROLES:
            raise DeployError(f"unknown role {role!r} for programs; roles: {', '.join(APP_ROLES)}.")
        self.config, self.conns, self.role = config, list(conns), role
        self.by_address = {conn.host: conn for conn in conns}
        self.hosts = [h for h in config.site_hosts if address_of(h) in self.by_address]
        self.app_hosts = [h for h in config.site_hosts if has_app(config.for_host(h))]
        self.members: dict[str, Member] = {}
        self.order: list[Member] = []
        self.progress = Progress(config.name)
        # The primary as `fab provision` checked it (provision connects on its own): where its history goes.
        self.provisioned_primary: Server | None = None
        self.keeper: LockKeeper | None = None

    @property
    def name(self) -> str:
        """What the command's title calls the site: its host, or its environment and how many hosts."""
        if len(self.hosts) == 1:
            return address_of(self.hosts[0])
        return f"{self.config.name} ({len(self.hosts)} hosts)"

    @property
    def whole(self) -> bool:
        return set(self.app_hosts) <= set(self.hosts)

    def require_whole(self, what: str) -> None:
        """Refuse a command that changes every app host together when -H names only some."""
        if not self.whole:
            raise DeployError(f"{what} acts on every host of the environment {self.config.name} at once: leave -H out.")

    @property
    def primary(self) -> Member:
        """The connected primary (the first web host: it migrates and keeps the backups)."""
        return self.members[self.config.primary]

    def history_server(self) -> Server | None:
        """Where the site's history is kept: the primary, when this command reached it."""
        member = self.members.get(self.config.primary)
        return member.server if member else self.provisioned_primary

    def connect_primary(self, progress: Progress, what: str = "the backups and the history are kept") -> Member:
        """Open and check the primary alone (it keeps the backups); refused when -H names another host, saying
        `what` happens on the primary."""
        if self.config.primary not in self.hosts:
            raise DeployError(
                f"{what} on the primary of {self.config.name}, {self.config.primary}: use -H with it, or leave -H out."
            )
        return self.connect(progress, [self.config.primary]).primary

    def db_server(self) -> Server:
        """A root session on the db host (where PostgreSQL and its archive are): the member's when it runs the app
        too (a site of one host), else a session of its own (a db host has no app user)."""
        db = self.config.role_hosts("db")
        if not db:
            raise DeployError(f"the environment {self.config.name} has no db host: the archive is the db host's.")
        if db[0] in self.members:
            return self.members[db[0]].server
        config = self.config.for_host(db[0])
        template = self.conns[0]
        conn = self.by_address.get(address_of(db[0])) or Connection(
            db[0], config=template.config, connect_timeout=template.connect_timeout
        )
        checked = connect(conn, replace(config, user="root"))  # NOTE: connect insists on the (absent) app user
        return Server(conn, config, checked.is_root, checked.sudo_password, app_home="/root")

    @property
    def several(self) -> bool:
        return len(self.order) > 1

    def acted_on(self, hosts: Sequence[str] | None = None) -> list[str]:
        """The app hosts a command acts on (or those of `hosts`): given, and of the site's role."""
        return [
            h
            for h in (hosts if hosts is not None else self.app_hosts)
            if h in self.hosts and (self.role is None or self.role in self.config.roles_of(h))
        ]

    def connect(self, progress: Progress, hosts: Sequence[str] | None = None) -> Site:
        """Open and check the app hosts acted on (of `role`; or only `hosts`), in parallel; each one's lines behind
        its name when there are several."""
        self.progress = progress
        wanted = self.acted_on(hosts)
        if not wanted:
            what = f"of role {self.role} " if self.role else ""
            raise DeployError(f"no app host {what}among {', '.join(self.hosts) or 'the given hosts'}.")

        def open_one(name: str) -> tuple[str, Server]:
            return name, connect(self.by_address[address_of(name)], self.config.for_host(name))

        opened = in_parallel(open_one, wanted, name=lambda h: h)
        width, lines = max(len(address_of(h)) for h in wanted), threading.Lock()

        def own_progress(name: str) -> Progress:
            if len(wanted) == 1:
                return progress
            return Progress(progress.title, out=PrefixedLines(f"[{address_of(name):<{width}}] ", progress.out, lines))

        self.members = {name: Member(name, server, own_progress(name)) for name, server in opened}
        self.order = [self.members[h] for h in rollout_order(self.config, list(self.members))]
        return self

    def hosts_with_layout(self) -> set[str]:
        """The app hosts acted on where provision has laid out the site's root, asked as root (a host it has not
        reached yet has no app user either)."""

        def laid_out(name: str) -> bool:
            config = self.config.for_host(name)
            server = connect(self.by_address[address_of(name)], replace(config, user="root"))
            test = sh("test", "-d", str(config.layout.root))
            return server.root(test, what="looking for the site's root", warn=True).exited == 0

        hosts = self.acted_on()
        found = in_parallel(laid_out, hosts, name=lambda h: h)
        return {name for name, there in zip(hosts, found, strict=True) if there}

    def connect_step(self, progress: Progress, hosts: Sequence[str] | None = None) -> Site:
        count = len(self.acted_on(hosts))
        with progress.step("connect" if count <= 1 else f"connect to the {count} hosts"):
            return self.connect(progress, hosts)

    def read_states(self, require: Callable[[ServerState, Server], None] = ServerState.require_provisioned) -> None:
        """Each member's state (in parallel), refused when provision has not prepared it (`require`: what it must
        have, as ServerState's require_provisioned or require_env_editable checks it)."""

        def read(member: Member) -> None:
            member.state = read_state(member.server)
            require(member.state, member.server)

        in_parallel(read, self.order, name=lambda m: m.host)

    def each(self, action: Callable[[Member], R]) -> list[R]:
        """`action` on every member at once."""
        return in_parallel(action, self.order, name=lambda m: m.host)

    def each_step(self, name: str, action: Callable[[Member], R]) -> list[R]:
        """`action` on every member at once, as one step of the command (on a site of one: the member's own steps)."""
        if not self.several:
            return self.each(action)
        with self.progress.step(f"{name} (on every host, in parallel)"):
            return self.each(action)

    def in_turn(self, title: Callable[[Member], str], action: Callable[[Member], None], members=None) -> None:
        """`action` on each member (or each of `members`) in rollout order, each a step titled `title(member)` (on a
        site of one: the member's own steps)."""
        for member in self.order if members is None else members:
            if not self.several:
                action(member)
                continue
            with self.progress.step(title(member)):
                action(member)

    def on_primary(self) -> str:
        """ " (on HOST)" after a step done on the primary alone, when there are several hosts."""
        return f" (on {self.primary.label})" if self.several else ""

    def hosts_phrase(self) -> str:
        """ " on N hosts" after what a command made true on every member, when there are several."""
        return f" on {len(self.order)} hosts" if self.several else ""

    @contextmanager
    def locked(self, action: str) -> Iterator[list[DeployLock]]:
        """Every member's deploy lock, taken in the config's order (two commands cannot deadlock), kept alive by one
        heartbeat during every step, released at the end; a failure prints the summary."""
        progress, locks = self.progress, []
        hosts = self.config.site_hosts
        with progress.step("take the deploy lock" + (f" on all {len(self.order)} hosts" if self.several else "")):
            try:
                for member in sorted(self.order, key=lambda m: hosts.index(m.host)):
                    lock = DeployLock(member.server, action)
                    lock.acquire()
                    locks.append(lock)
            except BaseException:
                for lock in locks:
                    lock.release()
                raise
        interval = min(20.0, self.config.lock_expiry_seconds / 4)
        try:
            with LockKeeper(locks, interval) as keeper:
                self.keeper = keeper
                progress.heartbeat = keeper.check
                for member in self.order:
                    member.progress.heartbeat = keeper.check
                yield locks
        except BaseException as exc:
            progress.say(progress.summary(f"FAILED ({type(exc).__name__})"))
            raise
        finally:
            self.keeper = None
            for holder in (progress, *(m.progress for m in self.order)):
                holder.heartbeat = None
            for lock in locks:
                try:
                    lock.release()
                except DeployError as exc:  # a host that is down keeps its lock until it expires
                    progress.say(
                        f"WARNING: the deploy lock on {lock.server.name} stays ({exc}); it expires after "
                        f"{self.config.lock_expiry_seconds} s without a step, or `fab unlock` removes it."
                    )

    @contextmanager
    def offline(self, server: Server) -> Iterator[None]:
        """`server` may not answer during the block (it reboots): the heartbeat leaves its lock alone meanwhile."""
        keeper = self.keeper
        if keeper is None:
            yield
            return
        with keeper.refreshing:
            keeper.offline.add(server.name)
        try:
            yield
        finally:
            keeper.offline.discard(server.name)

    @contextmanager
    def maintenance(self, reason: str) -> Iterator[None]:
        """The maintenance page on every web host and every program stopped, for the block."""
        with ExitStack() as stack:
            for member in self.order:
                if member.server.config.runs("web"):
                    stack.enter_context(maintenance_window(member.server, member.progress, reason))
            for member in self.order:
                host.stop(member)
            yield

    def start_all(self) -> None:
        for member in self.order:
            host.start(member)
