"""A four-host cluster of throwaway Debian 13 containers (tests/support/nspawn.py), booted in parallel, with the
deploy.toml that names them by role, and the real `fab` command line to act on it.

    lb    balancer
    web1  web, beat        (the primary: it migrates and keeps the backups)
    web2  web, worker, beat
    app   worker, db       (PostgreSQL and Redis for the whole cluster)

The containers reach each other with their own addresses (10.231.N.2); the machine running the tests is
none of them (to the containers it is each link's gateway, 10.231.N.1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.nspawn import DEFAULT_RELEASE, Container, build_rootfs, operator_env

REPO = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).with_name("fab")
ENVIRONMENT = "cluster"
# name -> roles, in the order deploy.toml's roles name the hosts.
ROLES = {
    "lb": ("balancer",),
    "web1": ("web", "beat"),
    "web2": ("web", "worker", "beat"),
    "app": ("worker", "db"),
}


@dataclass
class Cluster:
    """The booted containers by name (`cluster.web1` or `cluster["web1"]`), the deploy.toml naming them, and `fab`."""

    workdir: Path
    containers: dict[str, Container]
    config_path: Path
    roles: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(ROLES))
    settings: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    _provision: subprocess.CompletedProcess | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def boot(cls, workdir: Path, roles: dict[str, tuple[str, ...]] = ROLES, release: str = DEFAULT_RELEASE) -> Cluster:
        """Create and boot the containers in parallel (one SSH key for all), and write their deploy.toml (`roles`:
        another cluster's container names and roles; the first one's key reaches all)."""
        base = build_rootfs(release)
        containers: dict[str, Container] = {}
        for name in roles:  # one after the other: each picks a subnet no other container of the cluster has
            while True:
                container = Container(workdir / name)
                if container.subnet not in {other.subnet for other in containers.values()}:
                    break
            container.workdir.mkdir(parents=True)
            containers[name] = container
        started = time.monotonic()
        with ThreadPoolExecutor(len(containers)) as pool:
            list(pool.map(lambda container: container.create(base), containers.values()))
        key = next(iter(containers.values())).key
        for name, container in containers.items():  # `fab -i KEY` reaches every host with the first one's key
            with (container.rootfs / "root/.ssh/authorized_keys").open("a") as keys:
                keys.write(key.with_suffix(".pub").read_text())
            # Each host by its name (what the programs log, e.g. the beat leader's), not the rootfs's "vps"; and
            # the /etc/hosts a Debian VPS has (debootstrap writes none; PostgreSQL must resolve "localhost").
            (container.rootfs / "etc/hostname").write_text(f"{name}\n")
            (container.rootfs / "etc/hosts").write_text(
                f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            )
        cluster = cls(workdir, containers, workdir / "deploy.toml", dict(roles))
        try:
            with ThreadPoolExecutor(len(containers)) as pool:
                list(pool.map(lambda container: container.boot(), containers.values()))
        except BaseException:
            cluster.destroy()
            raise
        cluster.timings[f"boot {len(containers)} containers"] = time.monotonic() - started
        cluster.configure()
        return cluster

    def configure(self, settings: str = "") -> None:
        """(Re)write deploy.toml: the roles, and `settings` (TOML lines) for the environment."""
        self.settings = settings
        self.config_path.write_text(self.deploy_toml())

    def __getitem__(self, name: str) -> Container:
        return self.containers[name]

    def __getattr__(self, name: str) -> Container:
        containers = self.__dict__.get("containers", {})
        if name in containers:
            return containers[name]
        raise AttributeError(name)

    @property
    def key(self) -> Path:
        return next(iter(self.containers.values())).key

    def host(self, name: str) -> str:
        return f"root@{self.containers[name].address}"

    def deploy_toml(self) -> str:
        by_role: dict[str, list[str]] = {}
        for name, roles in self.roles.items():
            for role in roles:
                by_role.setdefault(role, []).append(self.host(name))
        lines = [f"[environments.{ENVIRONMENT}]", self.settings.strip(), f"[environments.{ENVIRONMENT}.roles]"]
        lines += [f"{role} = {json.dumps(hosts)}" for role, hosts in by_role.items()]
        return "\n".join(lines) + "\n"

    def fab_argv(self, *args: str) -> list[str]:
        """The real `fab -i KEY ARGS --env cluster --config PATH` (the environment added unless ARGS has one)."""
        command = [str(FAB), "-i", str(self.key), *args]
        if "--env" not in args:
            command += ["--env", ENVIRONMENT, "--config", str(self.config_path)]
        return command

    def fab_env(self) -> dict[str, str]:
        """The operator's environment for `fab`: trusts the containers' host keys; no SSH agent."""
        return operator_env(self.workdir / "operator", *self.containers.values())

    def fab(self, *args: str, timeout: float = 1200, stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run `fab_argv(ARGS)` and wait for it; `stdin`, when given, is piped to it."""
        return subprocess.run(
            self.fab_argv(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=self.fab_env(),
            input=stdin,
        )  # fmt: skip

    def provisioned(self) -> subprocess.CompletedProcess:
        """`fab provision` of the whole cluster, run once (the first caller times it); later calls return that run."""
        with self._lock:
            if self._provision is None:
                started = time.monotonic()
                self._provision = self.fab("provision")
                self.timings["provision, first run"] = time.monotonic() - started
            return self._provision

    def destroy(self) -> None:
        with ThreadPoolExecutor(len(self.containers)) as pool:
            list(pool.map(lambda container: container.destroy(), self.containers.values()))
