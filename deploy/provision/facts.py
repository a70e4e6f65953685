"""What provision reads about a server before it changes anything, and the refusal of one it cannot handle."""

from __future__ import annotations

import re
from collections.abc import Mapping

from deploy.errors import DeployError

MIN_PYTHON = (3, 11)

FACTS_SCRIPT = """\
if [ -d /run/systemd/system ]; then echo systemd=yes; else echo systemd=no; fi
echo "init=$(cat /proc/1/comm 2>/dev/null)"
if command -v apt-get >/dev/null 2>&1; then echo apt=yes; else echo apt=no; fi
echo "os=$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
echo "python=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
"""


def parse_facts(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def check_facts(facts: Mapping[str, str], where: str) -> None:
    """Refuse a server provision cannot handle, before anything changes, with what to do about it."""
    if facts.get("systemd") != "yes":
        raise DeployError(
            f"{where}: the server does not run systemd (PID 1 is {facts.get('init') or 'unknown'}), which provision "
            "needs to bring the site back after a reboot; use a Debian 13 or 12 server with systemd."
        )
    if facts.get("apt") != "yes":
        raise DeployError(
            f"{where}: no apt-get on {facts.get('os') or 'this system'}; provision supports Debian 13 and 12."
        )
    python = facts.get("python", "")
    if not re.fullmatch(r"\d+\.\d+", python) or tuple(map(int, python.split("."))) < MIN_PYTHON:
        found = f"python3 {python}" if python else "no python3"
        raise DeployError(
            f"{where}: {found}; the app needs python3 >= {'.'.join(map(str, MIN_PYTHON))} (Debian 13 has 3.13, "
            "Debian 12 3.11)."
        )
