"""The maintenance window: nginx answers 503 (Retry-After, a small page) while a flag file exists on the server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from deploy.progress import Progress
from deploy.ssh import Server, sh


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
