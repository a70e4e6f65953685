"""`invoke dev`: the same supervisord template as on servers, rendered for a checkout."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import sys
from pathlib import Path

from deploy.errors import DeployError
from deploy.render.supervisord import local_context, render_supervisord_conf

REPO_DIR = Path(__file__).resolve().parent.parent


def var_dir() -> Path:
    """Where local state lives (SQLite, broker folders, logs, socket): $VAR_DIR or var/ in the checkout."""
    return Path(os.environ.get("VAR_DIR") or REPO_DIR / "var").resolve()


def write_dev_config(port: int, python: str = sys.executable, color: bool = False) -> Path:
    """Render the local supervisord config into VAR/supervisord.conf (0600: it holds the socket's password)."""
    var = var_dir()
    for folder in (var / "run", var / "log"):
        folder.mkdir(parents=True, exist_ok=True)
    socket = var / "run" / "supervisor.sock"
    if socket.exists() and _supervisord_alive(var / "run" / "supervisord.pid"):
        raise DeployError(f"a local stack is already running (socket {socket}); stop it with Ctrl-C in its terminal.")
    environment = {"VAR_DIR": str(var), "PYTHONUNBUFFERED": "1"}
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "EMAIL_URL", "LOG_LEVEL", "DJANGO_SETTINGS_MODULE"):
        if os.environ.get(name):
            environment[name] = os.environ[name]
    context = local_context(
        REPO_DIR,
        var,
        python,
        port=port,
        environment=environment,
        stream_output=True,
        color=color,
        daemon_user=pwd.getpwuid(os.getuid()).pw_name,
        password=secrets.token_urlsafe(16),
    )
    config = var / "supervisord.conf"
    config.touch(mode=0o600)
    config.chmod(0o600)
    config.write_text(render_supervisord_conf(context))
    return config


def exec_supervisord(config: Path) -> None:
    """Replace this process with supervisord in the foreground, so Ctrl-C reaches it directly."""
    binary = shutil.which("supervisord", path=str(Path(sys.executable).parent)) or shutil.which("supervisord")
    if binary is None:
        raise DeployError("supervisord is not installed; run scripts/bootstrap (it installs the ops extra).")
    sys.stdout.flush()  # what was printed before exec would be lost in a pipe's buffer
    sys.stderr.flush()
    os.execv(binary, [binary, "-n", "-c", str(config)])


def _supervisord_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True
