"""Pure renderers of continuous archiving's files on the db host: pgBackRest's config, PostgreSQL's archive
drop-in, and the systemd units and timers of the full and differential backups."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from deploy.config import DeployConfig, archive_repository
from deploy.errors import DeployError
from deploy.render.env_file import DATABASE
from deploy.render.jinja import render_template, shell_join

PGBACKREST = "/usr/bin/pgbackrest"
PGBACKREST_DIR = PurePosixPath("/etc/pgbackrest")
PGBACKREST_CONF = PGBACKREST_DIR / "pgbackrest.conf"
# The backup_s3_ca_bundle's copy on the server (trusted for the archive's endpoint only).
CA_FILE = PGBACKREST_DIR / "s3-ca.pem"
# Seconds after which PostgreSQL switches to a new WAL segment, so an idle-ish server archives its last writes.
ARCHIVE_TIMEOUT = 60
BACKUP_KINDS = ("full", "diff")
POSTGRES_HOME = PurePosixPath("/var/lib/postgresql")
# pgBackRest's lock files (outside /tmp, which its units have a private one of: a full and a differential backup
# started together must still see each other's lock) and its log files: all its units may write.
LOCK_PATH = PurePosixPath("/var/lib/pgbackrest")
LOG_PATH = PurePosixPath("/var/log/pgbackrest")
# What its units may not call, on top of what @system-service leaves out. The restore test runs a PostgreSQL and
# pgBackRest's restore sets its files' owner: neither @resources nor @chown (in @privileged) is denied there.
BACKUP_DENIED_SYSCALLS = "~@privileged @resources"
VERIFY_DENIED_SYSCALLS = "~@mount @swap @reboot @raw-io @module @obsolete @debug @cpu-emulation @clock"
# The restore test's scratch PostgreSQL listens on a socket in its own directory only; the port names the socket.
VERIFY_PORT = 5499
# Every table of the public schema with its exact row count, as one JSON object (ordered by name).
ROW_COUNTS_SQL = (
    "SELECT coalesce(json_object_agg(table_name, (xpath('/row/c/text()', query_to_xml(format("
    "'SELECT count(*) AS c FROM %I.%I', table_schema, table_name), false, true, '')))[1]::text::bigint "
    "ORDER BY table_name), '{}') FROM information_schema.tables "
    "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
)
# The applied migrations ("app.name", sorted) as one JSON array; [] before the first migrate (no such table).
MIGRATIONS_SQL = (
    "SELECT CASE WHEN to_regclass('public.django_migrations') IS NULL THEN '[]' ELSE (xpath('/row/m/text()', "
    "query_to_xml('SELECT coalesce(json_agg(app || ''.'' || name ORDER BY app, name), ''[]'') AS m "
    "FROM django_migrations', false, true, '')))[1]::text END"
)
# What reaches the server from the operator's environment (or the git-ignored secrets file) at provision.
SECRET_NAMES = ("BACKUP_S3_KEY", "BACKUP_S3_KEY_SECRET", "BACKUP_CIPHER_PASS")
_SECRET = re.compile(r"[\x21-\x7e]+")  # printable, no spaces: each is one line of pgbackrest.conf


@dataclass(frozen=True)
class ArchiveSecrets:
    """The bucket's access key and secret, and the passphrase the archive is encrypted with."""

    s3_key: str
    s3_key_secret: str
    cipher_pass: str

    @classmethod
    def from_environment(cls, environ: dict[str, str]) -> ArchiveSecrets:
        """The three secrets by their names (SECRET_NAMES); one missing or malformed is refused, naming it."""
        missing = [name for name in SECRET_NAMES if not environ.get(name)]
        if missing:
            raise DeployError(f"backup_repository needs {', '.join(missing)} in the environment (or the secrets file).")
        for name in SECRET_NAMES:
            if not _SECRET.fullmatch(environ[name]):
                raise DeployError(f"{name} must be printable ASCII without spaces or line breaks.")
        return cls(*(environ[name] for name in SECRET_NAMES))


def stanza(config: DeployConfig) -> str:
    """pgBackRest's name for the archived PostgreSQL cluster: the app's user name."""
    return config.user


def pgbackrest_command(config: DeployConfig, *args: str) -> list[str]:
    """pgbackrest with the site's stanza, then `args` (options and the command)."""
    return [PGBACKREST, f"--stanza={stanza(config)}", *args]


def _repository(config: DeployConfig):
    repo = archive_repository(config)
    if repo is None:
        raise DeployError(f"{config.name}: backup_repository is not set; archiving is off.")
    return repo


def render_pgbackrest_conf(
    config: DeployConfig,
    secrets: ArchiveSecrets,
    *,
    pg_path: str,
    pg_port: int = 5432,
    ca_file: PurePosixPath = CA_FILE,
) -> str:
    """/etc/pgbackrest/pgbackrest.conf: the S3 repository, encrypted (aes-256-cbc), its retention, and the cluster
    at `pg_path` (the live data directory) on `pg_port`; `ca_file` is where backup_s3_ca_bundle's copy is."""
    return render_template(
        "pgbackrest.conf.j2",
        repo=_repository(config),
        ca_file=str(ca_file) if config.backup_s3_ca_bundle else "",
        secrets=secrets,
        full_keep=config.backup_full_keep,
        diff_keep=config.backup_diff_keep,
        stanza=stanza(config),
        lock_path=str(LOCK_PATH),
        pg_path=pg_path,
        pg_port=pg_port,
    )


def render_archive_settings(config: DeployConfig) -> str:
    """PostgreSQL's conf.d drop-in: archive every WAL segment with pgBackRest, and at least every ARCHIVE_TIMEOUT s."""
    return render_template(
        "postgresql-archive.conf.j2",
        archive_command=shell_join(pgbackrest_command(config, "archive-push")) + " %p",
        archive_timeout=ARCHIVE_TIMEOUT,
    )


def verify_unit_name(config: DeployConfig) -> str:
    """The name of the restore test's service (and, with .timer, its timer)."""
    return f"{config.user}-archive-verify"


def verify_script(config: DeployConfig) -> PurePosixPath:
    """Where the restore test's script lives on the db host (root's; run by its unit as postgres)."""
    return PurePosixPath("/usr/local/lib") / config.user / "archive-verify.sh"


def verify_status_file(config: DeployConfig) -> PurePosixPath:
    """The restore test's last result (JSON: ok, finished, seconds, the restored and live row counts, or error)."""
    return POSTGRES_HOME / f"{config.user}-archive-verify.json"


def render_verify_script(config: DeployConfig, *, pg_bin: str, live_port: int = 5432, database: str = DATABASE) -> str:
    """The restore test: the newest backup and its WAL into a scratch PostgreSQL (socket only, archiving off), its
    tables' row counts beside the live database's into the status file, the scratch copy removed; a failure
    recorded there too. `pg_bin` is the live cluster's server binaries' directory."""
    return render_template(
        "archive-verify.sh.j2",
        scratch=str(POSTGRES_HOME / f"{config.user}-archive-verify"),
        status_file=str(verify_status_file(config)),
        pg_bin=pg_bin,
        port=VERIFY_PORT,
        live_port=live_port,
        database=database,
        unit=verify_unit_name(config) + ".service",
        restore=pgbackrest_command(config, "--archive-mode=off", "--type=default", "restore"),
        counts_sql=ROW_COUNTS_SQL,
        migrations_sql=MIGRATIONS_SQL,
    )


def render_verify_units(config: DeployConfig, *, data_directory: str) -> dict[str, str]:
    """The restore test's oneshot service (as postgres, sandboxed: it writes pgBackRest's files and postgres's home
    only, the live cluster's `data_directory` read-only there) and its timer, by unit file name."""
    name = verify_unit_name(config)
    sandbox = {
        "writable": [str(LOCK_PATH), str(LOG_PATH), str(POSTGRES_HOME)],
        "read_only": [data_directory],
        "denied_syscalls": VERIFY_DENIED_SYSCALLS,
    }
    return {
        f"{name}.service": render_template("archive-verify.service.j2", script=str(verify_script(config)), **sandbox),
        f"{name}.timer": render_template("archive-verify.timer.j2", schedule=config.backup_verify_schedule),
    }


def backup_unit_name(config: DeployConfig, kind: str) -> str:
    """The name of the service (and, with .timer, the timer) taking `kind` backups: prayer-room-archive-full."""
    return f"{config.user}-archive-{kind}"


def render_backup_units(config: DeployConfig) -> dict[str, str]:
    """The full and differential backups' oneshot services (as postgres, sandboxed: they write pgBackRest's files
    only) and their timers, by unit file name."""
    sandbox = {"writable": [str(LOCK_PATH), str(LOG_PATH)], "read_only": [], "denied_syscalls": BACKUP_DENIED_SYSCALLS}
    schedules = {"full": config.backup_full_schedule, "diff": config.backup_diff_schedule}
    units = {}
    for kind in BACKUP_KINDS:
        name = backup_unit_name(config, kind)
        context = {"kind": kind, "schedule": schedules[kind], "repository": config.backup_repository}
        command = pgbackrest_command(config, f"--type={kind}", "backup")
        units[f"{name}.service"] = render_template("archive-backup.service.j2", command=command, **context, **sandbox)
        units[f"{name}.timer"] = render_template("archive-backup.timer.j2", **context)
    return units
