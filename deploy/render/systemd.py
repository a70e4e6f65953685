"""The systemd units provision installs: the app's supervisord, the daily backup, the watchdog, and drop-ins for
Debian's units."""

from __future__ import annotations

import ipaddress
import json
from pathlib import PurePosixPath

from deploy.config import DeployConfig, has_app
from deploy.render.db_host import FIREWALL_TABLE, FIREWALL_UNIT, NFT
from deploy.render.jinja import METADATA_NETWORKS, render_template

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
    """A systemd drop-in: the unit (PostgreSQL, Redis on the db address) starts once the network is up, after the
    db host's firewall, and refuses to start while the firewall's table is not loaded."""
    return render_template("after-network.conf.j2", unit=FIREWALL_UNIT, nft=NFT, table=FIREWALL_TABLE)


def acme_ca_path(config: DeployConfig) -> PurePosixPath:
    """Where provision puts acme_ca_bundle on the server (root-owned, world-readable: it is a public CA)."""
    return config.layout.etc / "acme-ca.pem"


def render_certbot_dropin(config: DeployConfig) -> str:
    """CERTBOT_DROPIN: certbot.timer's renewals trust acme_ca_bundle for the ACME server, nothing else does."""
    return render_template("certbot-ca.conf.j2", directory=config.acme_directory, bundle=str(acme_ca_path(config)))


WATCHDOG_SERVICE = "prayer-room-watchdog.service"
WATCHDOG_TIMER = "prayer-room-watchdog.timer"
# The watchdog's script and config, on every host (a balancer or db host has no app layout): root-only.
WATCHDOG_ETC = PurePosixPath("/etc/prayer-room-watchdog")
# Its open alerts and unsent notices: the service's StateDirectory, root-only.
WATCHDOG_STATE = PurePosixPath("/var/lib/prayer-room-watchdog")


def watchdog_script(config: DeployConfig) -> PurePosixPath:
    """The copy of deploy/on_server/watchdog.py the timer runs (root-owned; only provision writes it)."""
    return WATCHDOG_ETC / "watchdog.py"


def watchdog_config_path(config: DeployConfig) -> PurePosixPath:
    """What the watchdog checks on this host and where it sends alerts: root-only (webhook URLs hold tokens)."""
    return WATCHDOG_ETC / "watchdog.json"


def render_watchdog_config(config: DeployConfig, certificate: str = "") -> str:
    """The watchdog's JSON config for the host `config` is bound to: its roles (what it checks), whether it is the
    primary (beat, periodic tasks, backups), the certificate it holds (`certificate`: its cert.pem), the targets."""
    layout = config.layout
    host = config.hosts[0] if config.hosts else ""
    values = {
        "site": config.name,
        "host": host.rpartition("@")[2],
        "roles": sorted(config.host_roles),
        "primary": bool(host) and host == config.primary and has_app(config),
        "notify": list(config.notify),
        "env_files": [str(layout.env_file), str(layout.effective_env)] if has_app(config) else [],
        "current": str(layout.current),
        "lock": str(layout.lock) if has_app(config) else "",
        "lock_expiry_seconds": config.lock_expiry_seconds,
        "app_unit": UNIT if has_app(config) else "",
        "supervisorctl": config.supervisorctl,
        "web_ports": list(config.web_ports),
        "backup_dir": str(layout.backups),
        "backup_unit": BACKUP_SERVICE,
        "domain": config.domain,
        "certificate": certificate,
    }
    return json.dumps(values, indent=1, sort_keys=True) + "\n"


def watchdog_argv(config: DeployConfig, command: str, *args: str) -> list[str]:
    """The installed watchdog's command line: `run` (the timer's), `status`, `announce --notice JSON`."""
    return [config.python, "-I", str(watchdog_script(config)), "--config", str(watchdog_config_path(config)),
            "--state", str(WATCHDOG_STATE), command, *args]  # fmt: skip


def render_watchdog_units(config: DeployConfig) -> tuple[str, str]:
    """The watchdog's sandboxed oneshot service and its every-minute timer."""
    service = render_template(
        "watchdog.service.j2", command=watchdog_argv(config, "run"), state_directory=WATCHDOG_STATE.name
    )
    return service, render_template("watchdog.timer.j2")


EGRESS_TABLE = "prayer_room_egress"
EGRESS_UNIT = "prayer-room-egress.service"


def egress_rules_path(config: DeployConfig) -> PurePosixPath:
    return config.layout.etc / "egress.nft"


def render_egress_firewall(config: DeployConfig) -> str:
    """An app host's nftables table: the app user's and the build user's sockets reach no METADATA_NETWORKS address."""
    networks = [ipaddress.ip_network(network) for network in METADATA_NETWORKS]
    return render_template(
        "egress.nft.j2",
        table=EGRESS_TABLE,
        unit=EGRESS_UNIT,
        users=[config.user, config.build_user],
        ipv4=[str(network) for network in networks if network.version == 4],
        ipv6=[str(network) for network in networks if network.version == 6],
    )


def render_egress_unit(config: DeployConfig) -> str:
    """EGRESS_UNIT: loads the table at boot, before the programs' unit; stopping it leaves the table."""
    return render_template(
        "egress.service.j2", table=EGRESS_TABLE, nft=NFT, rules=str(egress_rules_path(config)), app_unit=UNIT
    )
