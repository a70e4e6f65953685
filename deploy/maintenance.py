"""The maintenance page: nginx answers 503 (Retry-After, a small page) while a flag exists on a web host.

Two flags, so neither turns the other off: the kit's own window (`window`, around a deploy's schema change or a
restore: the flag file) and the operator's switch (`fab maintenance on`: the page file, with the operator's message,
kept across deploys until `fab maintenance off`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from deploy.errors import DeployError
from deploy.progress import Progress
from deploy.render.nginx import render_maintenance_page
from deploy.ssh import Server, sh

MESSAGE_LIMIT = 500


def turn_on(server: Server) -> None:
    """nginx checks the flag on every request: no reload, and the page lives in the site's config."""
    server.root(sh("touch", server.config.layout.maintenance_flag), what="turning the maintenance page on")


def turn_off(server: Server) -> None:
    server.root(sh("rm", "-f", server.config.layout.maintenance_flag), what="turning the maintenance page off")


@contextmanager
def window(server: Server, progress: Progress, why: str) -> Iterator[None]:
    """The site answers 503 for the block; the window's length is printed (and recorded as a step)."""
    with progress.step(f"maintenance page on ({why})"):
        turn_on(server)
    started = time.monotonic()
    try:
        yield
    finally:
        turn_off(server)
        seconds = time.monotonic() - started
        progress.record("maintenance window (the site answered 503)", seconds)


def checked_message(message: str) -> str:
    """The operator's message for the page: one line of text, at most MESSAGE_LIMIT characters."""
    text = message.strip()
    if any(ord(char) < 32 or 127 <= ord(char) < 160 for char in text):
        raise DeployError("--message is one line of plain text (no newline or control character).")
    if len(text) > MESSAGE_LIMIT:
        raise DeployError(f"--message is {len(text)} characters long; keep it under {MESSAGE_LIMIT}.")
    return text


@dataclass(frozen=True)
class MaintenanceState:
    """What a web host's nginx answers with: the operator's switch (its record: since, by, message) and whether a
    kit's window is open."""

    operator: dict | None = None
    window: bool = False

    @property
    def on(self) -> bool:
        return self.operator is not None or self.window

    def line(self) -> str:
        """`fab status`'s words for it."""
        if self.operator is not None:
            record = self.operator
            message = record.get("message") or "no message"
            text = f"on since {record.get('since', '?')} (by {record.get('by', '?')}): {message}"
            return text + ("; a deploy's window is open too" if self.window else "")
        return "on (a deploy's or restore's own window)" if self.window else "off"


def state_command(server: Server) -> str:
    """Prints `operator` and the record when the operator's page is up, `window` when the kit's flag is."""
    layout = server.config.layout
    return (
        f"if [ -f {sh(layout.maintenance_page)} ]; then echo operator; cat {sh(layout.maintenance_record)}; echo; fi; "
        f"if [ -f {sh(layout.maintenance_flag)} ]; then echo window; fi"
    )


def parse_state(text: str) -> MaintenanceState:
    """`state_command`'s output."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    operator = None
    if "operator" in lines:
        after = lines[lines.index("operator") + 1 :]
        try:
            operator = json.loads(after[0]) if after and after[0].startswith("{") else {}
        except ValueError:
            operator = {}
    return MaintenanceState(operator=operator, window="window" in lines)


def read_state(server: Server) -> MaintenanceState:
    return parse_state(server.root(state_command(server), what="reading the maintenance state").stdout)


def switch_on(server: Server, record: dict) -> None:
    """The operator's page with `record`'s message up on this web host (the record first: the page is the flag)."""
    layout = server.config.layout
    page = render_maintenance_page(record.get("message", ""))
    server.upload(
        [
            (json.dumps(record, sort_keys=True) + "\n", layout.maintenance_record, "root", "600"),
            (page, layout.maintenance_page, "root", "644"),
        ],
        what="turning the maintenance page on",
    )


def switch_off(server: Server) -> None:
    """The operator's page down on this web host (the page first: it is the flag)."""
    layout = server.config.layout
    server.root(
        sh("rm", "-f", layout.maintenance_page) + " && " + sh("rm", "-f", layout.maintenance_record),
        what="turning the maintenance page off",
    )
