"""The programs under supervisord: their names, their config diff, and restarting each the way it needs."""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from deploy.commands import logs, supervisor
from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.layout import SUPERVISOR_GROUP
from deploy.ssh import Server

_ENV_PAIR = re.compile(r"""([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|'[^']*')""")


@dataclass(frozen=True)
class Programs:
    """supervisorctl names (group:program) of a server's processes, split by how they restart."""

    web: tuple[tuple[str, int], ...]  # (name, port), restarted one at a time
    others: tuple[str, ...]  # the worker(s), then beat

    @classmethod
    def from_config(cls, config: DeployConfig) -> Programs:
        """The programs of the host `config` is bound to: on a cluster, only those of its roles."""
        group = SUPERVISOR_GROUP
        web = tuple((f"{group}:web-{i}", port) for i, port in enumerate(config.web_ports, start=1))
        workers = [f"{group}:worker"] if config.workers == 1 else [f"{group}:worker-{n}" for n in range(config.workers)]
        return cls(
            web=web if config.runs("web") else (),
            others=(*(workers if config.runs("worker") else ()), *((f"{group}:beat",) if config.runs("beat") else ())),
        )

    @property
    def all(self) -> tuple[str, ...]:
        return (*(name for name, _ in self.web), *self.others)

    def select(self, program: str | None) -> Programs:
        """The subset named by `program` (web, web-1, worker, beat, ...); all of them for None."""
        if not program:
            return self

        def wanted(name: str) -> bool:
            short = name.split(":")[-1]
            return short == program or short.startswith(f"{program}-")

        subset = Programs(tuple(w for w in self.web if wanted(w[0])), tuple(n for n in self.others if wanted(n)))
        if not subset.all:
            known = sorted({n.split(":")[-1] for n in self.all} | {"web"})
            raise DeployError(f"unknown program {program!r}; programs: {', '.join(known)}.")
        return subset


def redact(text: str) -> str:
    """The config with each environment value replaced by a short hash: diffable, never showing a secret."""
    lines = []
    for line in text.splitlines():
        if line.startswith("environment="):
            pairs = _ENV_PAIR.findall(line[len("environment=") :])
            lines.append("environment=")
            lines += [f"    {key}=<{hashlib.sha256(value[1:-1].encode()).hexdigest()[:8]}>" for key, value in pairs]
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def config_diff(live: str | None, rendered: str) -> str:
    """A unified diff of the redacted configs; empty when they are the same."""
    return "".join(
        difflib.unified_diff(
            redact(live).splitlines(keepends=True) if live else [],
            redact(rendered).splitlines(keepends=True),
            fromfile="live programs.conf",
            tofile="rendered programs.conf",
        )
    )


def log_path(server: Server, name: str):
    """The log file of a supervisorctl name (group:program)."""
    return server.config.layout.logs / f"{name.split(':', 1)[-1]}.log"


def wait_running(server: Server, names: tuple[str, ...], timeout: float = 30) -> None:
    """Wait until every name is RUNNING; otherwise fail with their states and the tail of a failing log."""
    script = supervisor.wait_running(server.config, names, timeout)
    result = server.root(script, what="waiting for the programs", warn=True)
    if result.exited != 0:
        bad = [line.split()[0] for line in result.stdout.splitlines() if line.strip() and " RUNNING " not in line]
        tail = server.root(logs.tail([log_path(server, bad[0])], 8), what="log", warn=True).stdout if bad else ""
        states = " | ".join(result.stdout.strip().splitlines())
        raise DeployError(f"not RUNNING after {timeout:.0f} s: {states} -- last log lines: {tail[-600:]}")


def cycle(server: Server, name: str) -> None:
    result = server.root(supervisor.cycle(server.config, name), what=f"restarting {name}", warn=True)
    server.helper_lines(result, what=f"restarting {name}")


def rolling_restart(
    server: Server,
    programs: Programs,
    check_web: Callable[[int], None],
    step: Callable[[str], object],
    after_workers: str | None = None,
):
    """Web programs one at a time, each checked before the next stops; the workers and beat meanwhile.

    nginx sends requests to the web program that is not restarting (proxy_next_upstream), so none
    meets a closed port. `after_workers` (a root shell command: the ping check) runs once the workers
    have restarted, so no worker of the old release can take its task; its output is returned.
    """
    background: list[tuple[str, object]] = []
    marker = "@@after-workers@@"

    def start_others() -> None:
        workers = [n for n in programs.others if not n.endswith(":beat")]
        beat = [n for n in programs.others if n.endswith(":beat")]
        if workers:
            chain = supervisor.cycle(server.config, *workers)
            if after_workers:
                chain = f"{chain}; echo {marker}; {after_workers}"
            background.append((", ".join(workers), server.root(chain, what="restarting", asynchronous=True)))
        for name in beat:
            command = supervisor.cycle(server.config, name)
            background.append((name, server.root(command, what=f"restarting {name}", asynchronous=True)))

    try:
        for index, (name, port) in enumerate(programs.web):
            with step(f"restart {name.split(':')[-1]} (port {port}), wait for its health check"):
                cycle(server, name)
                check_web(port)
            if index == 0:
                # NOTE: after the first web program is back, so it boots without competing for the CPU.
                start_others()
        if not programs.web:
            start_others()
    except BaseException:
        for _, promise in background:
            promise.join()  # let the restarts started in the background finish before rolling back
        raise
    if not background:
        return None
    with step(f"restart {', '.join(n.split(':')[-1] for n in programs.others)} (worker: warm shutdown)"):
        results = [(names, promise.join()) for names, promise in background]
        for names, result in results:
            restarted = result.stdout.split(marker)[0]
            if '"ok": false' in restarted or (marker not in result.stdout and result.exited != 0):
                raise DeployError(f"restarting {names}: {(restarted.strip() or result.stderr.strip())[:500]}")
        wait_running(server, programs.others)
    return results[0][1] if after_workers else None
