"""Continuous archiving end to end, through the `fab` commands an operator runs: `fab provision` with a
backup_repository sets up pgBackRest on a fresh Debian 13 booted with systemd-nspawn, archiving its PostgreSQL to a
real S3 API (moto behind an nginx TLS front with a throwaway CA, tests/support/s3.py); then `fab deploy`,
`fab backup --verify`, `fab backups`, `fab status` and `fab restore --to-time/--latest`.

The tests run in file order over two containers. The first server: provision (a generated passphrase announced
once, a first full backup, every object in the bucket encrypted), a wrong passphrase and an unreachable bucket
refused, the operator's own settings accepted with nothing changed. Then a power cut: while that server takes
writes, a brand-new one is provisioned (it must not archive over the first's archive) and deployed; once the
first's WAL has reached the archive by archive_timeout alone, its plug is pulled and its disk thrown away, and
`fab restore --latest` on the new one brings back every write acknowledged up to 60 s before the cut. The new,
restored server is the one the rest use: the differential backup's unit, the restore test, a time outside the
archive refused, a point-in-time restore undoing a delete, a restore to the latest.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import s3
from tests.support.database import archive_now, sql
from tests.support.nspawn import Container, missing_tools, operator_env
from tests.support.units import exposure, measured_in, release_of

REPO = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).with_name("fab")
ARTIFACTS = REPO / "test-artifacts"
pytestmark = [
    pytest.mark.deploy,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(bool(missing_tools() or s3.missing_tools()), reason=str(missing_tools() or s3.missing_tools())),
]
PREFIX = f"archive-e2e-{secrets.token_hex(4)}"
MARKER = f"prayer-room-in-clear-{secrets.token_hex(8)}"
PGBACKREST_CONF = "/etc/pgbackrest/pgbackrest.conf"
timings: dict[str, float] = {}


@pytest.fixture(scope="module")
def operator(tmp_path_factory, s3_server) -> Path:
    """The operator's checkout: a deploy.toml archiving to the test bucket, its CA bundle beside it, no secrets file
    yet (no passphrase anywhere: the first provision makes one)."""
    directory = tmp_path_factory.mktemp("operator")
    shutil.copy(s3_server.ca, directory / "s3-ca.pem")
    (directory / "deploy.toml").write_text(
        "[defaults]\n"
        f'backup_repository = "s3://{s3_server.bucket}/{PREFIX}"\n'
        f'backup_s3_endpoint = "{s3_server.endpoint}:{s3_server.port}"\n'
        'backup_s3_uri_style = "path"\n'
        'backup_s3_ca_bundle = "s3-ca.pem"\n'
    )
    return directory


@dataclass
class Servers:
    """The module's servers: `first` until the power cut, then `new`, the one provisioned, deployed and restored
    after it, which the later tests use."""

    first: Container | None = None
    new: Container | None = None


@pytest.fixture(scope="module")
def servers(tmp_path_factory, s3_server):
    held = Servers()
    try:
        held.first = s3.boot_server(tmp_path_factory.mktemp("archive-vps"), s3_server)
        yield held
    finally:
        for container in (held.first, held.new):
            if container is not None:
                container.destroy()
        if timings:
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "archive-e2e-timings.json").write_text(json.dumps(timings, indent=1) + "\n")


@pytest.fixture
def vps(servers) -> Container:
    """The first server (until the power cut)."""
    assert servers.first is not None and servers.first.process is not None, "the first server is gone"
    return servers.first


@pytest.fixture
def restored(servers) -> Container:
    """The new server the power cut's test provisioned, deployed and restored to the latest."""
    assert servers.new is not None, "the power cut's test made no new server"
    return servers.new


def fab(vps: Container, operator: Path, *args: str, env: dict | None = None, name: str = "", timeout=900):
    """The real `fab` command line against the container with the operator's deploy.toml, the bucket's key in the
    environment (no passphrase: that one is in the operator's deploy.secrets once provision made it)."""
    command = [
        str(FAB),
        "-H",
        f"root@{vps.address}",
        "-i",
        str(vps.key),
        *args,
        "--config",
        str(operator / "deploy.toml"),
    ]
    environ = {
        **{k: v for k, v in operator_env(operator / "home", vps).items() if not k.startswith("BACKUP_")},
        "BACKUP_S3_KEY": s3.S3Server.key,
        "BACKUP_S3_KEY_SECRET": s3.S3Server.key_secret,
        **(env or {}),
    }
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environ)
    if name:
        timings[name] = round(time.monotonic() - started, 1)
    return result


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def refused(result: subprocess.CompletedProcess) -> str:
    """The one line of a refused command: 'error: ...', no traceback."""
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def health(vps: Container) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{vps.address}/health/", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def conf_digest(vps: Container) -> str:
    return vps.ssh(f"sha256sum {PGBACKREST_CONF} /etc/pgbackrest/s3-ca.pem; ls /etc/pgbackrest").stdout


def test_provision_archives_with_a_generated_passphrase_announced_once(vps, operator):
    out = ok(fab(vps, operator, "provision", name="fab provision (archive set up, first full backup)"))
    secrets_file = operator / "deploy.secrets"
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    passphrase = secrets_file.read_text().strip().removeprefix("BACKUP_CIPHER_PASS=")
    assert len(passphrase) >= 40 and passphrase not in out
    assert out.count("a new archive passphrase (BACKUP_CIPHER_PASS) was generated") == 1, out
    assert f"saved in {secrets_file}" in out
    assert re.search(r"archive \(.*\): archiving to s3://", out), out
    assert sql(vps, "SHOW archive_mode") == "on" and sql(vps, "SHOW archive_timeout") == "1min"
    timers = ["full.timer", "diff.timer", "verify.timer"]
    state = vps.ssh("systemctl is-enabled " + " ".join(f"prayer-room-archive-{t}" for t in timers)).stdout
    assert state.split() == ["enabled"] * 3
    conf = vps.ssh(f"stat -c '%U:%G %a' {PGBACKREST_CONF}").stdout.strip()
    assert conf == "root:postgres 640"
    ok(fab(vps, operator, "deploy", "--allow-dirty", name="fab deploy"))
    assert health(vps) == 200


def test_the_bucket_holds_nothing_in_clear(vps, operator, s3_server):
    sql(vps, "CREATE TABLE archive_probe (id int, note text)")
    # The app's role owns it, as it owns the app's tables (the pg_dump a restore takes first runs as that role).
    sql(
        vps,
        "DO $$ BEGIN EXECUTE format('ALTER TABLE archive_probe OWNER TO %I', (SELECT tableowner FROM pg_tables "
        "WHERE tablename = 'django_migrations')); END $$",
    )
    sql(vps, f"INSERT INTO archive_probe SELECT i, '{MARKER}' FROM generate_series(1, 500) i")
    archive_now(vps)
    objects = s3_server.objects(PREFIX + "/")
    assert any("/backup/" in key for key in objects) and any("/archive/" in key for key in objects), sorted(objects)
    in_clear = [key for key, data in objects.items() if not data.startswith(b"Salted__")]
    assert in_clear == [], in_clear  # every object is OpenSSL-format ciphertext (pgBackRest's aes-256-cbc)
    assert [key for key, data in objects.items() if MARKER.encode() in data] == []
    # Positive control: the same bytes are the archive's, readable with the passphrase (and only with it).
    passphrase = (operator / "deploy.secrets").read_text().strip().removeprefix("BACKUP_CIPHER_PASS=")
    info_file = next(data for key, data in objects.items() if key.endswith("/backup.info"))
    assert b"[backrest]" in decrypt(info_file, passphrase)
    assert b"[backrest]" not in decrypt(info_file, "not-the-passphrase")


def decrypt(data: bytes, passphrase: str) -> bytes:
    """An OpenSSL-format file decrypted as pgBackRest encrypts its info files (aes-256-cbc, key from SHA-1)."""
    command = ["openssl", "enc", "-d", "-aes-256-cbc", "-md", "sha1", "-pass", f"pass:{passphrase}"]
    return subprocess.run(command, input=data, capture_output=True).stdout


def test_a_wrong_passphrase_or_an_unreachable_bucket_is_refused_in_one_line_with_nothing_changed(vps, operator):
    before = conf_digest(vps)
    line = refused(fab(vps, operator, "provision", env={"BACKUP_CIPHER_PASS": "not-the-passphrase"}))
    assert "cannot be decrypted with this BACKUP_CIPHER_PASS" in line and "nothing was changed" in line, line
    assert conf_digest(vps) == before
    assert "not-the-passphrase" not in (operator / "deploy.secrets").read_text()

    elsewhere = operator / "unreachable"  # the same settings, but nothing listens at the endpoint's port
    elsewhere.mkdir()
    shutil.copy(operator / "s3-ca.pem", elsewhere)
    shutil.copy(operator / "deploy.secrets", elsewhere)
    text = (operator / "deploy.toml").read_text()
    (elsewhere / "deploy.toml").write_text(re.sub(r'(backup_s3_endpoint = "[^:]+):\d+"', r'\1:1"', text))
    line = refused(fab(vps, elsewhere, "provision"))
    assert "cannot read the archive" in line and "check backup_s3_endpoint" in line, line
    assert "nothing was changed" in line
    assert conf_digest(vps) == before
    # Positive control: the operator's own settings (the passphrase now from deploy.secrets) are accepted, change
    # nothing and announce no passphrase again.
    again = ok(fab(vps, operator, "provision", name="fab provision again"))
    assert "nothing changed" in again and "passphrase" not in again, again
    assert conf_digest(vps) == before


def test_a_power_cut_then_a_new_server_gets_every_write_up_to_60_s_before_it(servers, vps, operator, s3_server,
                                                                           tmp_path_factory):  # fmt: skip
    """Writes every 0.2 s; meanwhile a brand-new server is booted, provisioned (it must not archive over the first
    one's archive) and deployed. Once the first server's archiver has pushed WAL holding those writes by
    archive_timeout alone (nothing switches segments meanwhile), and the new server is ready, the plug is pulled
    and the disk thrown away; `fab restore --latest --yes` on the new server: every write acknowledged up to 60 s
    before the cut is back."""
    insert = "INSERT INTO archive_probe VALUES (3000, clock_timestamp()::text) RETURNING note"
    psql = f"runuser -u postgres -- psql -AtqX -d prayer_room -c {shlex.quote(insert)}"
    loop = f"cd / && while :; do {psql}; sleep 0.2; done"
    writer = subprocess.Popen(
        ["ssh", *vps.ssh_options(), f"root@{vps.address}", loop], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    acknowledged: list[str] = []

    def read() -> None:
        for line in writer.stdout:
            acknowledged.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        new = servers.new = s3.boot_server(tmp_path_factory.mktemp("archive-new-vps"), s3_server)
        deadline = time.monotonic() + 30
        while not acknowledged:
            assert time.monotonic() < deadline and writer.poll() is None, "the writer wrote nothing"
            time.sleep(0.2)
        first, writing_since = acknowledged[0].strip(), time.monotonic()
        # The segment being written now holds the first write (or follows the one that does).
        segment = sql(vps, "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")

        # The new server, bare, is made ready while the first still takes writes (its steps are timed one by one).
        out = ok(fab(new, operator, "provision", name="new server: fab provision"))
        assert "does not archive until `fab restore --latest --yes`" in out, out
        assert sql(new, "SHOW archive_mode") == "off"
        ok(fab(new, operator, "deploy", "--allow-dirty", name="new server: fab deploy"))

        # Then the cut, once that segment reached the archive through archive_timeout alone (nothing switches).
        deadline = time.monotonic() + 120
        while sql(vps, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < segment:
            assert time.monotonic() < deadline, f"{segment} did not reach the archive by archive_timeout in 120 s"
            assert writer.poll() is None, "the writer stopped before the cut"
            time.sleep(1)
        assert writer.poll() is None, "the writer stopped before the cut"
        timings["writes before the cut (s)"] = round(time.monotonic() - writing_since, 1)
        vps.pull_the_plug()
        cut = acknowledged[-1].strip()  # the last write the client saw committed
        writer.kill()
        shutil.rmtree(vps.rootfs)  # the disk is thrown away

        ok(fab(new, operator, "restore", "--latest", "--yes", name="new server: fab restore --latest"))
        back = sql(new, "SELECT max(note::timestamptz) FROM archive_probe WHERE id = 3000")
        lost = float(sql(new, f"SELECT extract(epoch FROM '{cut}'::timestamptz - '{back}'::timestamptz)"))
        timings["writes lost at the power cut (s; archive_timeout = 60 s)"] = round(lost, 1)
        timings["writes acknowledged before the cut"] = len(acknowledged)
        timings["bare server to serving the recovered data (s)"] = round(
            sum(timings[f"new server: fab {step}"] for step in ("provision", "deploy", "restore --latest")), 1
        )
        assert 0 <= lost <= 65, (cut, back)  # archive_timeout (60 s), then the segment's upload
        # Writes made after the writer began came back: archive_timeout pushed their segment, nothing else did.
        assert sql(new, f"SELECT '{back}'::timestamptz >= '{first}'::timestamptz") == "t", (first, back)
        assert sql(new, "SELECT count(*) FROM archive_probe WHERE id <= 500") == "500"  # and the earlier writes
        assert sql(new, "SHOW archive_mode") == "on"
        assert health(new) == 200
        sql(new, "INSERT INTO archive_probe VALUES (3001, 'the new server archives')")
        archive_now(new)
    finally:
        writer.kill()


def test_the_differential_backup_unit_and_fab_backups(restored, operator):
    started = time.monotonic()
    restored.ssh("systemctl start prayer-room-archive-diff.service")  # what its timer starts; a oneshot
    timings["differential backup (unit)"] = round(time.monotonic() - started, 1)
    # It ran inside its sandbox, as do the full backup and the restore test (9.0 unsandboxed).
    for service in measured_in(__name__):  # full, diff, verify
        measured, out = exposure(restored, service.unit)
        timings[f"systemd-analyze security {service.unit}"] = measured
        assert measured <= service.bound[release_of(restored)], out
    out = ok(fab(restored, operator, "backups"))
    archive = out.split("archive s3://", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in archive] == ["full", "diff", "WAL"], out
    wal = r"[0-9A-F]{24}"
    assert re.fullmatch(
        rf"full  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC  .* WAL {wal}\.\.{wal}  \d{{8}}-\d{{6}}F", archive[0].strip()
    )


def test_fab_backup_verify_restores_into_a_scratch_instance_and_status_shows_it(restored, operator):
    out = ok(fab(restored, operator, "backup", "--verify", name="fab backup --verify"))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "archive-e2e-verify.txt").write_text(out)
    assert "no unapplied migration" in out and "row counts match" in out, out
    result = json.loads(restored.ssh("cat /var/lib/postgresql/prayer-room-archive-verify.json").stdout)
    timings["restore test (its own seconds)"] = result["seconds"]
    assert result["ok"] and result["restored"] == result["live"], result
    assert result["restored"]["archive_probe"] == int(sql(restored, "SELECT count(*) FROM archive_probe")) > 500
    assert "prayer_room_api.0001_initial" in result["migrations"]
    versions = restored.ssh("ls /etc/postgresql").stdout.split()
    assert restored.ssh("ls /var/lib/postgresql").stdout.split() == [*versions, "prayer-room-archive-verify.json"]
    status = ok(fab(restored, operator, "status"))
    lines = [line for line in status.splitlines() if "archive" in line]
    assert not [line for line in lines if line.startswith("ALERT")], status
    assert any(line.startswith("archive: last restore test passed 0.0 h ago") for line in lines), status
    assert any(line.startswith("archive: newest backup 0.0 h old") for line in lines), status
    # The newest archived file is a WAL segment, or a backup's history file (000000010000000000000007.00000028.backup).
    assert any(re.match(r"archive: newest WAL [0-9A-F]{24}\S* archived \d+ s ago", line) for line in lines), status


def test_a_time_outside_the_archive_is_refused_naming_the_window(restored, operator):
    rows = sql(restored, "SELECT count(*) FROM archive_probe")
    line = refused(fab(restored, operator, "restore", "--to-time", "2020-01-01 00:00:00", "--yes"))
    assert re.search(r"outside the archive's window, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+0000 to now", line), line
    assert "nothing was changed" in line
    assert sql(restored, "SELECT count(*) FROM archive_probe") == rows
    assert health(restored) == 200


def test_a_point_in_time_restore_undoes_a_delete_made_after_t(restored, operator):
    rows = sql(restored, "SELECT count(*) FROM archive_probe")
    target = sql(restored, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')")
    while sql(restored, f"SELECT clock_timestamp() > '{target}+00'::timestamptz + interval '1 second'") != "t":
        time.sleep(0.2)
    sql(restored, "DELETE FROM archive_probe WHERE id > 100")
    assert sql(restored, "SELECT count(*) FROM archive_probe") == "100"
    out = ok(fab(restored, operator, "restore", "--to-time", f"{target}+00:00", "--yes", name="fab restore --to-time"))
    assert sql(restored, "SELECT count(*) FROM archive_probe") == rows, out
    assert sql(restored, "SELECT pg_is_in_recovery()") == "f"
    aside = re.search(r"the data directory it replaced is kept at (\S+)", out).group(1)
    assert restored.ssh(f"test -f {aside}/PG_VERSION", check=False).returncode == 0  # the state before, kept aside
    assert re.search(r"-restore-\S+\.dump \(", out), out  # and dumped first
    assert health(restored) == 200
    sql(restored, "INSERT INTO archive_probe VALUES (1000, 'the restored server archives again')")


def test_a_restore_to_the_latest_keeps_every_committed_write(restored, operator):
    out = ok(fab(restored, operator, "restore", "--latest", "--yes", name="fab restore --latest"))
    assert sql(restored, "SELECT count(*) FROM archive_probe WHERE id = 1000") == "1", out
    assert health(restored) == 200
