"""The systemd units provision installs: the app's supervisord, the daily backup, and drop-ins for Debian's units."""

from __future__ import annotations

from pathlib import PurePosixPath

from deploy.config import DeployConfig
from deploy.render.jinja import render_template

# Debian's supervisor package: root-owned and patched by apt. Its own system-wide
# supervisor.service is turned off; the app runs its own supervisord from UNIT with our config.
SUPERVISORD = "/usr/bin/supervisord"
UNIT = "prayer-room.service"
BACKUP_SERVICE = "prayer-room-backup.service"
BACKUP_TIMER = "prayer-room-backup.timer"
# systemd drop-in giving certbot.service (what certbot.timer starts) the ACME server's CA bundle.
CERTBOT_DROPIN = PurePosixPath("/etc/systemd/system/certbot.service.d/prayer-room-acme-ca.conf")


def render_unit(config: DeployConfig) -> str:
    """The systemd unit that keeps the app's supervisord (and so web, worker, beat) up across reboots, sandboxed.

    supervisord runs as root only to open the logs and setuid to the app user; the programs inherit the
    sandbox: the whole file system read-only but the log directory, no capabilities once they are the app user.
    """
    layout = config.layout
    run = PurePosixPath(layout.run)
    runtime = str(run.relative_to("/run")) if run.parent == PurePosixPath("/run") else None
    return render_template(
        "app.service.j2",
        supervisord=SUPERVISORD,
        supervisor_conf=str(layout.supervisor_conf),
        runtime_directory=runtime,
        writable=[str(layout.logs)] + ([] if runtime else [str(run)]),
        # The worker may take task_time_limit + 30 s to stop (its stopwaitsecs): wait a little longer.
        stop_timeout=config.task_time_limit + 60,
    )


def backup_helper(config: DeployConfig) -> PurePosixPath:
    """The copy of deploy/on_server/root_helper.py the backup timer runs (root-owned; a deploy never touches it)."""
    return config.layout.etc / "root_helper.py"


def render_backup_units(config: DeployConfig) -> tuple[str, str]:
    """The daily backup's oneshot service and its timer; the newest backup_keep daily backups are kept."""
    layout = config.layout
    service = render_template(
        "backup.service.j2",
        python=config.python,
        helper=str(backup_helper(config)),
        env_file=str(layout.env_file),
        backup_dir=str(layout.backups),
        current=str(layout.current),
        keep=config.backup_keep,
        pg_bin=["--pg-bin", config.postgres_bin] if config.postgres_bin else [],
    )
    return service, render_template("backup.timer.j2")


def render_after_network_dropin() -> str:
    """A systemd drop-in: the unit (PostgreSQL, Redis on the db address) starts once the network is up."""
    return render_template("after-network.conf.j2")


def acme_ca_path(config: DeployConfig) -> PurePosixPath:
    """Where provision puts acme_ca_bundle on the server (root-owned, world-readable: it is a public CA)."""
    return config.layout.etc / "acme-ca.pem"


def render_certbot_dropin(config: DeployConfig) -> str:
    """CERTBOT_DROPIN: certbot.timer's renewals trust acme_ca_bundle for the ACME server, nothing else does."""
    return render_template("certbot-ca.conf.j2", directory=config.acme_directory, bundle=str(acme_ca_path(config)))
