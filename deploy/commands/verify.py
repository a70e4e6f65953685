"""The checks' command lines: the ping task through a worker of the new release."""

from __future__ import annotations

from deploy.commands.helpers import app_helper
from deploy.config import DeployConfig


def ping(config: DeployConfig, release_dir: object, release_id: str, app_home: str, programs_text: str = "") -> str:
    """A root shell command: the ping task through the broker must come back from a worker of `release_id`.

    On a cluster it goes to this host's own queue, so another host's worker cannot answer for it; but only when
    `programs_text` (the programs config being made live) has the workers consume it: a release deployed before the
    host had its queue is pinged through the shared one.
    """
    queue = config.host_queue
    own = ("--queue", queue) if queue and f"celery,{queue}" in programs_text else ()
    args = ("ping", "--expect", release_id, "--timeout", config.health_timeout, *own)
    return app_helper(config, release_dir, *args, app_home=app_home)
