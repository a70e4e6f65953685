"""Continuous archiving's steps on the db host (pgBackRest, Debian's package): install and configure it, read the
archive, restore a point in time. Each step runs through a `ssh.Server` (root, upload, read); the files come
from deploy/render/archive.py."""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.render.archive import (
    BACKUP_KINDS,
    CA_FILE,
    LOCK_PATH,
    LOG_PATH,
    PGBACKREST_CONF,
    ArchiveSecrets,
    backup_unit_name,
    pgbackrest_command,
    render_archive_settings,
    render_backup_units,
    render_pgbackrest_conf,
    render_verify_script,
    render_verify_units,
    verify_script,
    verify_status_file,
    verify_unit_name,
)
from deploy.ssh import Server, sh

UNIT_DIR = PurePosixPath("/etc/systemd/system")
ARCHIVE_DROPIN = "prayer-room-archive.conf"
INFO_IO_TIMEOUT = 5
_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?([+-]\d\d(:?\d\d)?|Z)?")


def as_postgres(command: list[str]) -> str:
    """A root shell command running `command` as PostgreSQL's user, from a directory it may enter."""
    return "cd / && " + sh("runuser", "-u", "postgres", "--", *command)


def psql(server: Server, sql: str, *, what: str) -> str:
    """One SQL statement as PostgreSQL's superuser; its rows as unaligned text."""
    return server.root(as_postgres(["psql", "-AtX", "-c", sql]), what=what).stdout.strip()


@dataclass(frozen=True)
class Cluster:
    """The db host's live PostgreSQL cluster: where its config and data are, and its port."""

    config_file: PurePosixPath
    data_directory: PurePosixPath
    port: int

    @property
    def dropin(self) -> PurePosixPath:
        return self.config_file.parent / "conf.d" / ARCHIVE_DROPIN

    @property
    def bin(self) -> PurePosixPath:
        """Debian's directory of this cluster's server binaries (pg_ctl), from its version."""
        return PurePosixPath("/usr/lib/postgresql") / self.config_file.parent.parent.name / "bin"

    @property
    def unit(self) -> str:
        """Debian's unit for this cluster (postgresql@15-main), from its config's path /etc/postgresql/15/main."""
        return f"postgresql@{self.config_file.parent.parent.name}-{self.config_file.parent.name}"


def live_cluster(server: Server) -> Cluster:
    row = psql(
        server,
        "SELECT current_setting('config_file'), current_setting('data_directory'), current_setting('port')",
        what="reading PostgreSQL's settings",
    )
    config_file, data_directory, port = row.split("|")
    return Cluster(PurePosixPath(config_file), PurePosixPath(data_directory), int(port))


def wait_until_writable(server: Server, timeout: int = 120) -> None:
    """Wait until PostgreSQL accepts connections and is out of recovery (a restore replays WAL first)."""
    probe = (
        f"for i in $(seq {timeout * 5}); do "
        + as_postgres(["psql", "-AtXc", "SELECT pg_is_in_recovery()"])
        + " 2>/dev/null | grep -qx f && exit 0; sleep 0.2; done; exit 1"
    )
    if server.root(probe, what="waiting for PostgreSQL", warn=True).exited != 0:
        log = server.root("journalctl -u 'postgresql*' -n 8 --no-pager", what="reading the log", warn=True)
        raise DeployError(f"PostgreSQL did not come up writable on {server.name}: {log.stdout.strip()[-800:]}")


def archive_info(server: Server, config: DeployConfig, *, conf: PurePosixPath = PGBACKREST_CONF) -> dict:
    """pgBackRest's view of the site's stanza (`info --output=json`); an unreadable archive raises one line: a
    wrong BACKUP_CIPHER_PASS, or a bucket that cannot be reached."""
    result = server.root(
        # NOTE: pgBackRest retries an endpoint that refuses connections until its io-timeout has passed several
        # times: 4 min at the default 60 s, 20 s at 5 s. Reading the archive's info is small.
        as_postgres(
            pgbackrest_command(config, f"--config={conf}", f"--io-timeout={INFO_IO_TIMEOUT}", "--output=json", "info")
        ),
        what="reading the archive",
        warn=True,
    )
    try:
        stanza = json.loads(result.stdout, strict=False)[0]  # its messages may quote undecryptable bytes
    except (ValueError, IndexError, KeyError) as exc:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise DeployError(
            f"cannot read the archive {config.backup_repository} from {server.name}: {detail[-1] if detail else exc}"
        ) from exc
    # 0 ok; 1 no stanza yet, 2 no backup yet, 3 stanza without its info files: a new archive. 99: unreadable.
    problem = next(
        (repo["status"] for repo in stanza.get("repo", []) if repo["status"]["code"] not in (0, 1, 2, 3)), None
    )
    if problem:
        message = problem["message"]
        # A wrong passphrase: [FormatError] (pgBackRest 2.45, Debian 12) or [CryptoError] (Debian 13's).
        if "unable to load info file" in message and ("FormatError" in message or "CryptoError" in message):
            raise DeployError(
                f"the archive {config.backup_repository} cannot be decrypted with this BACKUP_CIPHER_PASS: give the "
                "passphrase it was made with (nothing was changed)."
            )
        first = message.splitlines()[0][:300]
        raise DeployError(
            f"cannot read the archive {config.backup_repository} from {server.name} ({first}): check "
            "backup_s3_endpoint, the bucket and BACKUP_S3_KEY / BACKUP_S3_KEY_SECRET (nothing was changed)."
        )
    return stanza


@dataclass(frozen=True)
class Installed:
    """What `install` did: whether anything changed, and whether the archive holds another cluster's data (this is a
    new server replacing the one that made it) so that archiving waits for `restore` to bring that data here."""

    changed: bool
    awaiting_restore: bool = False


def install(server: Server, config: DeployConfig, secrets: ArchiveSecrets) -> Installed:
    """Archive the db host's PostgreSQL to the bucket: pgBackRest (provision's packages step installs it) configured,
    the restore test's script and the units in place, then archiving started (`start_archiving`).

    The new config is tried against the bucket before anything is put in place: a wrong passphrase or an
    unreachable bucket is one line, with nothing changed. When the archive already holds another cluster's data
    (a new server replacing a lost one), PostgreSQL is left not archiving: `restore` brings that data here first."""
    cluster = live_cluster(server)
    facts = {"pg_path": str(cluster.data_directory), "pg_port": cluster.port}
    conf = render_pgbackrest_conf(config, secrets, **facts)
    # Tried first from files beside the live ones (the config and the CA bundle), put in place once accepted.
    candidate, candidate_ca = PGBACKREST_CONF.with_name("pgbackrest.conf.new"), CA_FILE.with_name("s3-ca.pem.new")
    trial = render_pgbackrest_conf(config, secrets, **facts, ca_file=candidate_ca)
    files: list[tuple[bytes | str, object, str, str]] = [(trial, candidate, "root:postgres", "0640")]
    if config.backup_s3_ca_bundle:
        files.append((Path(config.backup_s3_ca_bundle).read_text(), candidate_ca, "root", "0644"))
    server.upload(files, what="uploading the archive's config")
    try:
        info = archive_info(server, config, conf=candidate)
    except DeployError:
        server.root(sh("rm", "-f", candidate, candidate_ca), what="removing the refused config")
        raise
    databases = info.get("db", [])
    local = int(psql(server, "SELECT system_identifier FROM pg_control_system()", what="reading the cluster's id"))
    foreign = bool(databases) and databases[-1]["system-id"] != local
    changed = server.read(PGBACKREST_CONF, what="reading pgBackRest's config") != conf
    units = {**render_backup_units(config), **render_verify_units(config, data_directory=str(cluster.data_directory))}
    script = render_verify_script(config, pg_bin=str(cluster.bin), live_port=cluster.port)
    ca = (sh("mv", candidate_ca, CA_FILE) + " && ") if config.backup_s3_ca_bundle else ""
    # The directories pgBackRest writes: its sandboxed units are given them, so they must exist.
    directories = sh("install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0750", LOCK_PATH, LOG_PATH)
    server.upload(
        [(script, verify_script(config), "root", "0755"), (conf, PGBACKREST_CONF, "root:postgres", "0640")]
        + [(text, UNIT_DIR / name, "root", "0644") for name, text in units.items()],
        then=ca + sh("rm", candidate) + " && " + directories + " && systemctl daemon-reload",
        what="installing the archive's config and units",
    )
    if foreign:
        if server.read(cluster.dropin, what="reading the archive settings") is not None:
            # This cluster must not push its WAL over the archive's: archiving stays off until `restore`.
            server.root(sh("rm", cluster.dropin) + " && " + sh("systemctl", "restart", cluster.unit),
                        what="turning this cluster's archiving off")  # fmt: skip
            wait_until_writable(server)
        return Installed(True, awaiting_restore=True)
    return Installed(start_archiving(server, config, cluster) or changed)


def start_archiving(server: Server, config: DeployConfig, cluster: Cluster) -> bool:
    """PostgreSQL's archive drop-in in place (a restart when archive_mode was off), the stanza created, WAL
    archiving checked, the timers on, and a first full backup if the archive has none. True when it changed."""
    dropin = render_archive_settings(config)
    changed = server.read(cluster.dropin, what="reading the archive settings") != dropin
    if changed:
        server.upload([(dropin, cluster.dropin, "postgres:postgres", "0644")], what="writing the archive settings")
    if psql(server, "SHOW archive_mode", what="reading archive_mode") != "on":
        server.root(sh("systemctl", "restart", cluster.unit), what="restarting PostgreSQL to archive its WAL")
        changed = True
    else:
        psql(server, "SELECT pg_reload_conf()", what="reloading PostgreSQL's settings")
    wait_until_writable(server)
    server.root(as_postgres(pgbackrest_command(config, "stanza-create")), what="creating the archive's stanza")
    server.root(as_postgres(pgbackrest_command(config, "check")), what="checking that WAL reaches the archive")
    timers = [f"{backup_unit_name(config, kind)}.timer" for kind in BACKUP_KINDS] + [
        f"{verify_unit_name(config)}.timer"
    ]
    server.root(sh("systemctl", "enable", "--now", *timers), what="starting the backup timers")
    if not archive_info(server, config).get("backup"):
        backup(server, config, "full")
        changed = True
    return changed


def backup(server: Server, config: DeployConfig, kind: str) -> None:
    """Take a `kind` (full or diff) backup now, through its unit (as the timer would)."""
    unit = backup_unit_name(config, kind) + ".service"
    server.root(sh("systemctl", "start", unit), what=f"taking a {kind} backup ({unit})")


def verify(server: Server, config: DeployConfig) -> dict:
    """Run the restore test now, through its unit (as the timer would): its result, or one line saying why not."""
    unit = verify_unit_name(config) + ".service"
    run = server.root(sh("systemctl", "start", unit), what=f"running the restore test ({unit})", warn=True)
    text = server.read(verify_status_file(config), what="reading the restore test's result")
    result = json.loads(text) if text else {"ok": False, "error": "it wrote no result"}
    if run.exited != 0 or not result.get("ok"):
        log = server.root(sh("journalctl", "-u", unit, "-n", "3", "--no-pager", "-o", "cat"), what="reading", warn=True)
        last = " / ".join(log.stdout.strip().splitlines()[-3:])
        raise DeployError(f"the restore test failed on {server.name}: {result.get('error')} ({last})")
    return result


def count_differences(result: dict) -> list[str]:
    """The restore test's tables whose row count differs from the live one's (writes after the newest archived WAL)
    or that the restored copy lacks, one line each."""
    restored, live = result.get("restored", {}), result.get("live", {})
    return [
        f"{table}: {live[table]} rows live, " + (f"{restored[table]} restored" if table in restored else "not restored")
        for table in sorted(live)
        if restored.get(table) != live[table]
    ]


def archive_current_wal(server: Server, timeout: int = 120) -> str:
    """Close the WAL segment being written and wait until the archive has it: the archive then holds every
    transaction committed so far. The segment's name."""
    segment = psql(server, "SELECT pg_walfile_name(pg_switch_wal())", what="switching to a new WAL segment")
    probe = (
        f"for i in $(seq {timeout * 2}); do w=$("
        + as_postgres(["psql", "-AtXc", "SELECT last_archived_wal FROM pg_stat_archiver"])
        + f') && [ -n "$w" ] && [ "$w" \\> {sh(segment)} -o "$w" = {sh(segment)} ] && exit 0; sleep 0.5; done; exit 1'
    )
    if server.root(probe, what="waiting for the WAL to reach the archive", warn=True).exited != 0:
        raise DeployError(
            f"WAL segment {segment} did not reach the archive in {timeout} s on {server.name}: see "
            "`journalctl -u 'postgresql*'` and /var/log/pgbackrest there."
        )
    return segment


def restore_window(info: dict) -> tuple[datetime, datetime]:
    """The earliest and latest points the archive can restore to: the oldest backup's end, and now."""
    ends = [entry["timestamp"]["stop"] for entry in info.get("backup", [])]
    if not ends:
        raise DeployError(
            "the archive holds no backup yet: `fab provision` takes the first (or wait for the backup timers); "
            "nothing was changed."
        )
    return datetime.fromtimestamp(min(ends), UTC), datetime.now(UTC)


def check_target(info: dict, target: datetime | None) -> tuple[datetime, datetime]:
    """The archive's window (`restore_window`); a `target` outside it is refused, naming the window."""
    earliest, latest = restore_window(info)
    if target is not None and not earliest <= target <= latest:
        raise DeployError(
            f"{target:%Y-%m-%d %H:%M:%S%z} is outside the archive's window, {earliest:%Y-%m-%d %H:%M:%S}+0000 to now "
            f"({latest:%Y-%m-%d %H:%M:%S}+0000); nothing was changed."
        )
    return earliest, latest


def parse_target_time(text: str) -> datetime:
    """A --to-time value, "YYYY-MM-DD HH:MM:SS[+TZ]" (UTC without +TZ), as an aware datetime."""
    if not _TIME.fullmatch(text.strip()):
        raise DeployError(f'--to-time must be "YYYY-MM-DD HH:MM:SS[+TZ]" (UTC without +TZ), got {text!r}.')
    moment = datetime.fromisoformat(text.strip())
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def restore(server: Server, config: DeployConfig, target: datetime | None = None) -> PurePosixPath:
    """Restore the db host's PostgreSQL from the archive: to `target` (a point in time), or to the newest archived
    transaction. The live WAL is archived first, and the data directory kept aside (its path is returned); on a
    failure it is put back and PostgreSQL started on it again. Archiving goes on from the restored data (on a new
    server, it starts there)."""
    check_target(archive_info(server, config), target)
    cluster = live_cluster(server)
    if psql(server, "SHOW archive_mode", what="reading archive_mode") == "on":
        archive_current_wal(server)
    aside = cluster.data_directory.with_name(
        f"{cluster.data_directory.name}.before-restore-{time.strftime('%Y%m%dT%H%M%S')}"
    )
    at = target.astimezone(UTC) if target else None
    options = ["--type=time", f"--target={at:%Y-%m-%d %H:%M:%S.%f}+00", "--target-action=promote"] if at else []
    data = sh(cluster.data_directory)
    server.root(
        " && ".join([
            sh("systemctl", "stop", cluster.unit),
            sh("mv", cluster.data_directory, aside),
            sh("install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0700", cluster.data_directory),
        ]),
        what="stopping PostgreSQL and keeping its data aside",
    )  # fmt: skip
    try:
        server.root(as_postgres(pgbackrest_command(config, *options, "restore")), what="restoring from the archive")
        server.root(sh("systemctl", "start", cluster.unit), what="starting the restored PostgreSQL")
        wait_until_writable(server)
    except DeployError as exc:
        server.root(
            f"systemctl stop {sh(cluster.unit)}; rm -rf {data} && mv {sh(aside)} {data} && "
            + sh("systemctl", "start", cluster.unit),
            what="putting the data from before the restore back",
            warn=True,
        )
        raise DeployError(f"{exc} (the data from before the restore is back in place)") from exc
    start_archiving(server, config, cluster)
    return aside


# --- What the operator's machine adds: the secrets, and the archive's lines in `fab backups` and `fab status`.
_CONF_SECRETS = {
    "repo1-s3-key": "BACKUP_S3_KEY",
    "repo1-s3-key-secret": "BACKUP_S3_KEY_SECRET",
    "repo1-cipher-pass": "BACKUP_CIPHER_PASS",
}
# The timers run the newest backup daily and the restore test daily: older than this, one of them is late.
LATE_AFTER = 26 * 3600


def read_secrets_file(path: Path) -> dict[str, str]:
    """The BACKUP_* values of the operator's secrets file (KEY=value lines, # comments); {} without one."""
    if not path.is_file():
        return {}
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise DeployError(f"{path}:{number}: expected KEY=value, got {line.strip()[:40]!r}.")
        values[key.strip()] = value.strip()
    return {key: value for key, value in values.items() if key in _CONF_SECRETS.values()}


def secrets_from_conf(text: str) -> dict[str, str]:
    """The BACKUP_* values a server's pgbackrest.conf already holds (what an earlier provision put there)."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in _CONF_SECRETS:
            values[_CONF_SECRETS[key.strip()]] = value.strip()
    return values


def choose_secrets(
    environ: dict[str, str], secrets_file: Path, on_server: dict[str, str]
) -> tuple[ArchiveSecrets, bool]:
    """The archive's secrets: the operator's environment, else the secrets file, else what the server holds; with
    no passphrase anywhere, a new one, saved to the secrets file (0600). (secrets, whether it was generated)."""
    given = read_secrets_file(secrets_file)
    values = {**on_server, **given, **{k: v for k, v in environ.items() if k in _CONF_SECRETS.values() and v}}
    generated = not values.get("BACKUP_CIPHER_PASS")
    if generated:
        values["BACKUP_CIPHER_PASS"] = secrets.token_urlsafe(32)
    chosen = ArchiveSecrets.from_environment(values)
    if generated:
        old = secrets_file.read_text() if secrets_file.is_file() else ""
        _write_private(secrets_file, old + ("" if old.endswith("\n") or not old else "\n")
                       + f"BACKUP_CIPHER_PASS={chosen.cipher_pass}\n")  # fmt: skip
    return chosen, generated


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def ensure_archive(server: Server, say) -> tuple[bool, str]:
    """Provision's archive step on the db host: the secrets chosen (`choose_secrets`), then `install`. A generated
    passphrase is announced through `say`, once (the next provision finds it in the secrets file); a refused one is
    taken out of the secrets file again, so that the operator's real passphrase is not shadowed by it."""
    config = server.config
    secrets_file = config.secrets_file
    before = secrets_file.read_text() if secrets_file.is_file() else None
    on_server = secrets_from_conf(server.read(PGBACKREST_CONF, what="reading pgBackRest's config") or "")
    chosen, generated = choose_secrets(dict(os.environ), secrets_file, on_server)
    try:
        installed = install(server, config, chosen)
    except DeployError:
        if generated:
            if before is None:
                secrets_file.unlink(missing_ok=True)
            else:
                _write_private(secrets_file, before)
        raise
    if generated:
        say(f"   NOTE: {passphrase_notice(secrets_file)}")
    if installed.awaiting_restore:
        return True, (
            "the archive holds another server's data: this PostgreSQL does not archive until `fab restore --latest "
            "--yes` brings that data here"
        )
    return installed.changed, f"archiving to {config.backup_repository}"


def passphrase_notice(secrets_file: Path) -> str:
    """What the operator is told, once, when provision made the archive's passphrase."""
    return (
        f"a new archive passphrase (BACKUP_CIPHER_PASS) was generated and saved in {secrets_file}: keep a copy off "
        "this machine and off the server (a password manager); without it the archive cannot be read."
    )


def backup_lines(server: Server, config: DeployConfig) -> list[str]:
    """`fab backups`'s archive part, read from the db host."""
    return format_backups(archive_info(server, config))


def status_lines(server: Server, config: DeployConfig) -> list[str]:
    """`fab status`'s archive part, read from the db host: the archive, WAL archiving's state, the restore test."""
    info = archive_info(server, config)
    verified = server.read(verify_status_file(config), what="reading the restore test's result")
    archiver = psql(
        server,
        "SELECT json_build_object('last_archived_wal', last_archived_wal, 'last_archived_time', "
        "extract(epoch FROM last_archived_time), 'last_failed_wal', last_failed_wal, 'last_failed_time', "
        "extract(epoch FROM last_failed_time)) FROM pg_stat_archiver",
        what="reading WAL archiving's state",
    )
    return format_archive_status(info, json.loads(verified) if verified else None, json.loads(archiver), time.time())


def _size(octets: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if octets < 1000 or unit == "GB":
            return f"{octets:.0f} {unit}" if unit == "B" else f"{octets:.1f} {unit}"
        octets /= 1000
    return ""


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_backups(info: dict) -> list[str]:
    """The archive's backups for `fab backups`, oldest first: type, end time, size, WAL range; then the WAL kept."""
    lines = []
    for entry in info.get("backup", []):
        archive = entry.get("archive", {})
        lines.append(
            f"{entry['type']:<4}  {_when(entry['timestamp']['stop'])}  {_size(entry['info']['size'])} "
            f"({_size(entry['info']['repository']['delta'])} in the bucket)  "
            f"WAL {archive.get('start', '?')}..{archive.get('stop', '?')}  {entry['label']}"
        )
    wal = [(item["min"], item["max"]) for item in info.get("archive", []) if item.get("min")]
    if wal:
        lines.append(f"WAL archived: {wal[0][0]}..{wal[-1][1]}")
    return lines or ["the archive holds no backup yet"]


def format_archive_status(info: dict, verified: dict | None, archiver: dict, now: float) -> list[str]:
    """`fab status`'s archive lines: the newest backup's age, WAL archiving's state, the last restore test; each
    late or failed one starts with ALERT."""
    lines = []
    ends = [entry["timestamp"]["stop"] for entry in info.get("backup", [])]
    if not ends:
        lines.append("ALERT archive: no backup yet")
    else:
        age = now - max(ends)
        lines.append(("ALERT " if age > LATE_AFTER else "") + f"archive: newest backup {age / 3600:.1f} h old")
    failed, archived = archiver.get("last_failed_time"), archiver.get("last_archived_time")
    if failed and (not archived or failed > archived):
        lines.append(f"ALERT archive: WAL archiving failing since {_when(failed)} ({archiver.get('last_failed_wal')})")
    elif archived:
        lines.append(f"archive: newest WAL {archiver.get('last_archived_wal')} archived {now - archived:.0f} s ago")
    if not verified:
        lines.append("ALERT archive: no restore test yet")
    elif not verified.get("ok"):
        lines.append(
            f"ALERT archive: the last restore test failed ({_when(verified['finished'])}): {verified['error']}"
        )
    else:
        age = now - verified["finished"]
        late = "ALERT " if age > LATE_AFTER else ""
        lines.append(f"{late}archive: last restore test passed {age / 3600:.1f} h ago in {verified['seconds']} s")
    return lines
