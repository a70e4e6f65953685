"""Continuous archiving end to end: the kit's archive steps (deploy/archive.py) on a fresh Debian 13 booted with
systemd-nspawn, with PostgreSQL from Debian's package, archiving through pgBackRest to a real S3 API (moto behind
an nginx TLS front with a throwaway CA, tests/support/s3.py).

The tests share one container and run in file order: archiving set up (a first full backup, every object in the
bucket encrypted), WAL archived within archive_timeout, a wrong passphrase refused, the differential backup's
unit, the restore test into a scratch instance, a time outside the archive refused, a point-in-time restore
undoing a delete, a restore to the latest, and a new server (its disk thrown away) getting every archived write.
"""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fabric import Connection

from deploy import archive
from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.render.archive import PGBACKREST_CONF
from deploy.ssh import Server
from tests.support import s3
from tests.support.nspawn import Container, build_rootfs, missing_tools

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(bool(missing_tools() or s3.missing_tools()), reason=str(missing_tools() or s3.missing_tools())),
]
PREFIX = f"archive-e2e-{secrets.token_hex(4)}"
MARKER = f"prayer-room-in-clear-{secrets.token_hex(8)}"
timings: dict[str, float] = {}


@pytest.fixture(scope="module")
def vps(tmp_path_factory, s3_server):
    """A fresh Debian 13 that resolves the S3 endpoint to this machine, with Debian's PostgreSQL installed."""
    container = Container(tmp_path_factory.mktemp("archive-vps")).create(build_rootfs())
    (container.rootfs / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n127.0.1.1\tvps\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        + s3_server.hosts_lines(container.gateway)
    )
    try:
        container.boot()
        started = time.monotonic()
        install = (
            "export DEBIAN_FRONTEND=noninteractive && apt-get update -q && "
            "apt-get install -y -q --no-install-recommends postgresql && "
            "cd / && runuser -u postgres -- createdb prayer_room"
        )
        ssh = ["ssh", *container.ssh_options(), f"root@{container.address}", install]
        subprocess.run(ssh, check=True, capture_output=True, timeout=600)
        timings["install PostgreSQL (by hand)"] = time.monotonic() - started
        yield container
    finally:
        started = time.monotonic()
        container.stop(timeout=20)  # nothing on it needs to survive: a halt that takes longer is cut short
        timings["power off"] = round(time.monotonic() - started, 1)
        container.destroy()
        timings["power off and remove"] = round(time.monotonic() - started, 1)
        if timings:
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "archive-e2e-timings.json").write_text(json.dumps(timings, indent=1) + "\n")


@pytest.fixture(scope="module")
def config(s3_server):
    return DeployConfig(
        backup_repository=f"s3://{s3_server.bucket}/{PREFIX}",
        backup_s3_endpoint=f"{s3_server.endpoint}:{s3_server.port}",
        backup_s3_uri_style="path",
        backup_s3_ca_bundle=str(s3_server.ca),
    )


@pytest.fixture(scope="module")
def archive_secrets(tmp_path_factory):
    """The bucket's key from the operator's environment; no passphrase anywhere, so one is generated and saved."""
    environ = {"BACKUP_S3_KEY": s3.S3Server.key, "BACKUP_S3_KEY_SECRET": s3.S3Server.key_secret}
    chosen, generated = archive.choose_secrets(environ, tmp_path_factory.mktemp("operator") / "deploy.secrets", {})
    assert generated
    return chosen


@pytest.fixture(scope="module")
def server(vps, config):
    """The kit's SSH session to the container as root."""
    conn = Connection(vps.address, user="root", connect_kwargs={"key_filename": str(vps.key), "allow_agent": False})
    yield Server(conn, config, is_root=True, sudo_password=False, app_home="/root")
    conn.close()


def sql(vps: Container, statement: str) -> str:
    """One statement in the app's database (the one the restore test counts rows in)."""
    command = f"cd / && runuser -u postgres -- psql -AtX -d prayer_room -c {shlex.quote(statement)}"
    return vps.ssh(command).stdout.strip()


def timed(name: str, step, *args, **kwargs):
    started = time.monotonic()
    result = step(*args, **kwargs)
    timings[name] = round(time.monotonic() - started, 1)
    return result


def test_archiving_starts_with_a_full_backup_and_the_bucket_holds_nothing_in_clear(
    vps, server, config, s3_server, archive_secrets
):
    sql(vps, "CREATE TABLE prayer (id int, note text)")
    sql(vps, f"INSERT INTO prayer SELECT i, '{MARKER}' FROM generate_series(1, 500) i")
    assert timed(
        "archiving set up, first full backup", archive.install, server, config, archive_secrets
    ) == archive.Installed(True)
    assert sql(vps, "SHOW archive_mode") == "on" and sql(vps, "SHOW archive_timeout") == "1min"
    info = archive.archive_info(server, config)
    assert [backup["type"] for backup in info["backup"]] == ["full"]
    timers = vps.ssh("systemctl is-enabled prayer-room-archive-full.timer prayer-room-archive-diff.timer").stdout
    assert timers.split() == ["enabled", "enabled"]

    objects = timed("read the bucket", s3_server.objects, PREFIX + "/")
    assert any("/backup/" in key for key in objects) and any("/archive/" in key for key in objects), sorted(objects)
    in_clear = [key for key, data in objects.items() if not data.startswith(b"Salted__")]
    assert in_clear == [], in_clear  # every object is OpenSSL-format ciphertext (pgBackRest's aes-256-cbc)
    assert [key for key, data in objects.items() if MARKER.encode() in data] == []
    # Positive control: the same bytes are the archive's, readable with the passphrase (and only with it).
    info_file = next(data for key, data in objects.items() if key.endswith("/backup.info"))
    assert b"[backrest]" in decrypt(info_file, archive_secrets.cipher_pass)
    assert b"[backrest]" not in decrypt(info_file, "not-the-passphrase")


def decrypt(data: bytes, passphrase: str) -> bytes:
    """An OpenSSL-format file decrypted as pgBackRest encrypts its info files (aes-256-cbc, key from SHA-1)."""
    command = ["openssl", "enc", "-d", "-aes-256-cbc", "-md", "sha1", "-pass", f"pass:{passphrase}"]
    return subprocess.run(command, input=data, capture_output=True).stdout


def test_wal_reaches_the_archive_within_archive_timeout_without_a_switch(vps):
    sql(vps, "INSERT INTO prayer VALUES (-1, 'a write the next WAL switch must archive')")
    written = time.monotonic()
    segment = sql(vps, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    while sql(vps, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < segment:
        assert time.monotonic() - written < 90, "the segment was not archived within archive_timeout (60 s)"
        time.sleep(1)
    timings["archive lag of a write (archive_timeout = 60 s)"] = round(time.monotonic() - written, 1)
    assert time.monotonic() - written < 75


def test_a_wrong_passphrase_is_refused_in_one_line_with_nothing_changed(vps, server, config, archive_secrets):
    before = vps.ssh(f"sha256sum {PGBACKREST_CONF} /etc/pgbackrest/s3-ca.pem").stdout
    with pytest.raises(DeployError) as refused:
        archive.install(server, config, replace(archive_secrets, cipher_pass="not-the-passphrase"))
    message = str(refused.value)
    assert "\n" not in message and "cannot be decrypted with this BACKUP_CIPHER_PASS" in message, message
    assert vps.ssh(f"sha256sum {PGBACKREST_CONF} /etc/pgbackrest/s3-ca.pem").stdout == before
    assert vps.ssh("ls /etc/pgbackrest").stdout.split() == ["pgbackrest.conf", "s3-ca.pem"]
    # Positive control: the right one is accepted, and changes nothing either; so is what the server holds.
    on_server = archive.secrets_from_conf(vps.ssh(f"cat {PGBACKREST_CONF}").stdout)
    assert archive.choose_secrets({}, Path("/nonexistent"), on_server) == (archive_secrets, False)
    assert archive.install(server, config, archive_secrets) == archive.Installed(False)


def test_the_differential_backup_unit_adds_a_diff_backup(server, config):
    timed("differential backup (unit)", archive.backup, server, config, "diff")
    assert [backup["type"] for backup in archive.archive_info(server, config)["backup"]] == ["full", "diff"]


def test_the_restore_test_restores_the_newest_backup_and_its_wal_into_a_scratch_instance(vps, server, config):
    result = timed("restore test (scratch instance)", archive.verify, server, config)
    assert result["ok"] and result["restored"] == result["live"] == {"prayer": 501}, result
    versions = vps.ssh("ls /etc/postgresql").stdout.split()  # the cluster's: 17 on Debian 13, 15 on Debian 12
    assert vps.ssh("ls /var/lib/postgresql").stdout.split() == [*versions, "prayer-room-archive-verify.json"]
    assert vps.ssh("systemctl is-enabled prayer-room-archive-verify.timer").stdout.strip() == "enabled"


def test_backups_and_status_read_the_archive(server, config):
    backups = archive.backup_lines(server, config)
    assert [line.split()[0] for line in backups] == ["full", "diff", "WAL"], backups
    status = archive.status_lines(server, config)
    assert len(status) == 3 and not [line for line in status if line.startswith("ALERT")], status
    assert status[2].startswith("archive: last restore test passed 0.0 h ago"), status


def test_a_time_outside_the_archive_is_refused_naming_the_window(vps, server, config):
    with pytest.raises(DeployError, match="outside the archive's window, .* to now") as refused:
        archive.restore(server, config, archive.parse_target_time("2020-01-01 00:00:00"))
    assert "\n" not in str(refused.value) and "nothing was changed" in str(refused.value)
    assert sql(vps, "SELECT count(*) FROM prayer") == "501"


def test_a_point_in_time_restore_undoes_a_delete_made_after_t(vps, server, config):
    target = sql(vps, "SELECT clock_timestamp()")
    while sql(vps, f"SELECT clock_timestamp() > '{target}'::timestamptz + interval '1 second'") != "t":
        time.sleep(0.2)
    sql(vps, "DELETE FROM prayer WHERE id > 100")
    assert sql(vps, "SELECT count(*) FROM prayer") == "101"
    aside = timed("point-in-time restore", archive.restore, server, config, archive.parse_target_time(target))
    assert sql(vps, "SELECT count(*) FROM prayer") == "501"
    assert sql(vps, "SELECT pg_is_in_recovery()") == "f"
    assert vps.ssh(f"test -f {aside}/PG_VERSION", check=False).returncode == 0  # the state before, kept aside


def test_a_restore_to_the_latest_keeps_every_committed_write(vps, server, config):
    sql(vps, "INSERT INTO prayer VALUES (1000, 'committed just before the restore')")
    timed("restore to the latest", archive.restore, server, config)
    assert sql(vps, "SELECT count(*) FROM prayer WHERE id = 1000") == "1"
    sql(vps, "INSERT INTO prayer VALUES (1001, 'the restored server archives again')")
    archive.archive_current_wal(server)


def test_a_new_server_with_the_old_disk_thrown_away_gets_every_archived_write_back(
    vps, server, config, archive_secrets
):
    sql(vps, "INSERT INTO prayer VALUES (2000, 'the last write before the disk is lost')")
    archive.archive_current_wal(server)  # archive_timeout would do it within 60 s (the lag test above)
    # A brand-new server: a new PostgreSQL cluster (another system identifier, no data, no archive settings) and
    # none of the archive's files; only pgBackRest's package stays installed.
    vps.ssh(
        "v=$(ls /etc/postgresql) && pg_dropcluster --stop $v main && pg_createcluster $v main --start >/dev/null && "
        "rm -r /etc/pgbackrest /usr/local/lib/prayer-room /etc/systemd/system/prayer-room-archive-* && "
        "systemctl daemon-reload && cd / && runuser -u postgres -- createdb prayer_room"
    )
    installed = timed("new server: archive set up", archive.install, server, config, archive_secrets)
    assert installed.awaiting_restore and sql(vps, "SHOW archive_mode") == "off"  # it must not archive over the old
    timed("new server: restore to the latest", archive.restore, server, config)
    assert sql(vps, "SELECT count(*) FROM prayer WHERE id = 2000") == "1"
    assert sql(vps, "SHOW archive_mode") == "on"
    sql(vps, "INSERT INTO prayer VALUES (2001, 'the new server archives')")
    archive.archive_current_wal(server)
