"""The backups' command lines: the root helper's backup, backups and restore, and staging a download."""

from __future__ import annotations

from deploy.commands import sh
from deploy.commands.helpers import root_helper
from deploy.config import DeployConfig
from deploy.render.systemd import BACKUP_TIMER


def _backups_helper(config: DeployConfig, command: str, *args: object) -> str:
    pg_bin = ("--pg-bin", config.postgres_bin) if config.postgres_bin else ()
    return root_helper(config, command, "--dir", config.layout.backups, *args, *pg_bin)


def take(config: DeployConfig, kind: str, release: str | None) -> str:
    """pg_dump into a new backup of `kind` named after `release`, keeping the newest backup_keep of that kind."""
    keep = ("--keep", config.backup_keep)
    return _backups_helper(config, "backup", "--kind", kind, "--release", release or "", *keep)


def listing(config: DeployConfig) -> str:
    """The backups' records and the server's clock."""
    return _backups_helper(config, "backups")


def restore(config: DeployConfig, name: str, aside: str) -> str:
    """Replace the database with backup `name` in one transaction, pg_restore running as the build user (not root,
    and not the app user, whose role wrote the object names in the dump); the schema it replaces is kept in schema
    `aside` until the restore committed."""
    return _backups_helper(config, "restore", name, "--as-user", config.build_user, "--aside", aside)


def recover(config: DeployConfig, put_back: str = "", *, check: bool = False) -> str:
    """Settle a restore stopped between its transactions; `put_back`: the aside schema of a restore that failed;
    `check`: change nothing, only say what such a restore left."""
    options = (*(("--put-back", put_back) if put_back else ()), *(("--check",) if check else ()))
    return _backups_helper(config, "recover", "--as-user", config.build_user, *options)


def stage_download(config: DeployConfig, name: str, tmp: str, login: str) -> str:
    """Copy backup `name` to `tmp` (made by the login user), owned by the login user so SFTP can read it."""
    return f"cp {sh(config.layout.backups / name)} {sh(tmp)} && chown {sh(login)} {sh(tmp)}"


def timer_state() -> str:
    """The daily backup timer's load, unit file and active states, its next run (`next=`, Unix time: systemctl shows
    it as a date, whatever --timestamp says, so `date -d` converts it), then the server's clock; `now=` alone where
    systemctl does not answer (no systemd)."""
    timer = sh(BACKUP_TIMER)
    return (
        f"systemctl show --property=LoadState --property=UnitFileState --property=ActiveState {timer} 2>/dev/null\n"
        f"next=$(systemctl show --property=NextElapseUSecRealtime --value {timer} 2>/dev/null)\n"
        'if [ -n "$next" ] && next=$(date -d "$next" +%s 2>/dev/null); then echo "next=$next"; fi\n'
        "echo now=$(date +%s)\n"
    )
