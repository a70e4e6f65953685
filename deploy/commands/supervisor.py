"""supervisord's command lines: supervisorctl against the app's supervisord, restarting programs, waiting for them."""

from __future__ import annotations

from deploy.commands import sh
from deploy.commands.helpers import root_helper
from deploy.config import DeployConfig


def supervisorctl(config: DeployConfig, *args: object) -> str:
    """supervisorctl ARGS against the app's supervisord (its absolute config)."""
    return sh(config.supervisorctl, "-c", config.layout.supervisor_conf, *args)


def cycle(config: DeployConfig, *names: str) -> str:
    """Stop each program (graceful, waited for), then start it without waiting for startsecs; the caller's check
    (health, ping, beat's log) is the readiness test."""
    return root_helper(config, "cycle", "--socket", config.layout.supervisor_socket, *names, env_file=False)


def wait_running(config: DeployConfig, names: tuple[str, ...], timeout: float) -> str:
    """Exit 0 once every name is RUNNING; after `timeout` seconds, print their states and exit 1."""
    status = supervisorctl(config, "status", *names)
    return (
        f"end=$(( $(date +%s) + {int(timeout)} )); while :; do out=$({status}); "
        f'n=$(printf "%s\\n" "$out" | grep -c " RUNNING "); [ "$n" -ge {len(names)} ] && exit 0; '
        '[ $(date +%s) -ge $end ] && { printf "%s\\n" "$out"; exit 1; }; sleep 0.3; done'
    )
