"""The programs under supervisord: install their config, restart each the way it needs, read their state."""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from deploy.errors import DeployError
from deploy.remote import Server, sh

_ENV_PAIR = re.compile(r"""([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|'[^']*')""")


@dataclass(frozen=True)
class Programs:
    """supervisorctl names of one rendered config, split by how they restart."""

    web: tuple[tuple[str, int], ...]  # (name, port)
    others: tuple[str, ...]  # worker(s), then beat

    @classmethod
    def from_context(cls, context: dict) -> Programs:
        group = context["group"]
        web = tuple((f"{group}:web-{i}", port) for i, port in enumerate(context["web_ports"], start=1))
        workers = context["processes"].get("worker", 0)
        worker_names = [f"{group}:worker"] if workers == 1 else [f"{group}:worker-{n}" for n in range(workers)]
        return cls(web=web, others=(*worker_names, f"{group}:beat"))

    @property
    def all(self) -> tuple[str, ...]:
        return (*(name for name, _ in self.web), *self.others)


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


def live_config(server: Server) -> str | None:
    return server.read(server.config.layout.programs_conf, what="reading the live supervisord programs")


def stored_config(server: Server, release_id: str) -> str | None:
    """The programs config a release was deployed with (kept for rollback)."""
    return server.read(server.config.layout.etc / "releases" / f"{release_id}.conf", what="reading a release's config")


def store_config(server: Server, release_id: str, text: str) -> None:
    dest = server.config.layout.etc / "releases" / f"{release_id}.conf"
    server.upload(text, dest, owner="root", mode="0600", what="keeping the release's supervisord programs")


def install_config(server: Server, text: str) -> None:
    """Write programs.conf (root, 0600: it holds the env file's values)."""
    server.upload(text, server.config.layout.programs_conf, owner="root", mode="0600", what="installing programs.conf")


def check_supervisord(server: Server) -> None:
    if server.supervisorctl("pid", what="asking supervisord", warn=True).exited != 0:
        raise DeployError(
            f"supervisord is not answering on {server.config.layout.supervisor_socket} on {server.name}; "
            "start the prayer-room service (systemctl status prayer-room), or run `fab provision`."
        )


def states(server: Server) -> dict[str, str]:
    """supervisorctl name -> state (RUNNING, STARTING, FATAL, ...) for every program supervisord knows."""
    out = server.supervisorctl("status", what="reading program states", warn=True).stdout
    result = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isupper():
            result[parts[0]] = parts[1]
    return result


def log_path(server: Server, name: str):
    """The log file of a supervisorctl name (group:program)."""
    return server.config.layout.logs / f"{name.split(':', 1)[-1]}.log"


def log_size(server: Server, name: str) -> int:
    out = server.root(f"stat -c %s {sh(log_path(server, name))} 2>/dev/null || echo 0", what="sizing a log").stdout
    return int(out.strip() or 0)


def log_tail(server: Server, name: str, lines: int = 30) -> str:
    return server.root(sh("tail", "-n", lines, log_path(server, name)), what="reading a log", warn=True).stdout


def apply_config(server: Server) -> None:
    """`supervisorctl update`: load a changed programs.conf (supervisord restarts the changed group as a whole)."""
    server.supervisorctl("update", what="supervisorctl update")


def wait_running(server: Server, names: tuple[str, ...] | list[str], timeout: float = 30) -> None:
    """Wait until every name is RUNNING; a FATAL/BACKOFF program fails with the tail of its log."""
    script = (
        f"end=$(( $(date +%s) + {int(timeout)} )); while :; do "
        f"out=$({sh(server.config.supervisorctl, '-c', server.config.layout.supervisor_conf, 'status', *names)}); "
        'n=$(printf "%s\\n" "$out" | grep -c " RUNNING "); '
        f'[ "$n" -ge {len(names)} ] && exit 0; [ $(date +%s) -ge $end ] && {{ printf "%s\\n" "$out"; exit 1; }}; '
        "sleep 0.3; done"
    )
    result = server.root(script, what="waiting for the programs", warn=True)
    if result.exited != 0:
        bad = [line.split()[0] for line in result.stdout.splitlines() if " RUNNING " not in line and line.strip()]
        detail = "; ".join(f"{name}: {log_tail(server, name, 8).strip()[-600:]}" for name in bad[:2])
        raise DeployError(f"not RUNNING after {timeout:.0f} s: {result.stdout.strip()} -- last log lines: {detail}")


def restart(server: Server, *names: str, asynchronous: bool = False):
    """`supervisorctl restart`: stop (TERM, waiting stopwaitsecs) then start; the old process is gone first."""
    return server.supervisorctl(
        "restart", *names, what=f"restarting {', '.join(names)}", warn=True, asynchronous=asynchronous
    )


def rolling_restart(
    server: Server, programs: Programs, check_web: Callable[[str, int], None], step: Callable[[str], object]
) -> None:
    """Web programs one at a time (each checked before the next stops), worker and beat meanwhile.

    nginx keeps sending requests to the web program that is not restarting (proxy_next_upstream),
    so no request meets a closed port.
    """
    background = restart(server, *programs.others, asynchronous=True)
    try:
        for name, port in programs.web:
            with step(f"restart {name.split(':')[-1]} (port {port}) and check it"):
                restart(server, name)
                check_web(name, port)
    finally:
        result = background.join()
    with step(f"restart {', '.join(n.split(':')[-1] for n in programs.others)} (warm shutdown, beat stopped first)"):
        if result.exited != 0 and "ERROR" in result.stdout:
            raise DeployError(f"restarting worker and beat: {result.stdout.strip()}")
        wait_running(server, programs.others)
