"""The installed watchdog's command lines (deploy/on_server/watchdog.py, provision's root-owned copy)."""

from __future__ import annotations

import json

from deploy.commands import sh
from deploy.config import DeployConfig
from deploy.render.systemd import watchdog_argv, watchdog_script


def status(config: DeployConfig) -> str:
    """The open alerts, as one JSON line; `{"installed": false}` where provision has not installed it yet."""
    missing = sh("echo", json.dumps({"installed": False}))
    return f"if test -f {sh(watchdog_script(config))}; then {sh(*watchdog_argv(config, 'status'))}; else {missing}; fi"


def announce(config: DeployConfig, body: dict) -> str:
    """Queue `body` for the email targets and send it through the programs' EMAIL_URL."""
    return sh(*watchdog_argv(config, "announce", "--notice", json.dumps(body)))
