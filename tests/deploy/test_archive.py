"""Continuous archiving without a server: deploy.toml's backup_repository and backup_s3_* settings, pgBackRest's
config, PostgreSQL's archive drop-in, the backup units and timers, the restore's time checks."""

import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy.archive import (
    choose_secrets,
    count_differences,
    format_archive_status,
    format_backups,
    parse_target_time,
    restore_window,
    secrets_from_conf,
)
from deploy.config import archive_repository, load_config
from deploy.errors import DeployError
from deploy.provision.host import packages_for
from deploy.render.archive import (
    ArchiveSecrets,
    render_archive_settings,
    render_backup_units,
    render_pgbackrest_conf,
    render_verify_script,
    render_verify_units,
)

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SECRETS = ArchiveSecrets("AKIAEXAMPLE", "s3cr3t/key+value", "a-long-passphrase")


def config_from(tmp_path: Path, settings: str):
    path = tmp_path / "deploy.toml"
    path.write_text("[defaults]\n" + settings)
    return load_config(path)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_archiving_is_off_by_default_and_the_endpoint_defaults_to_aws(tmp_path):
    assert archive_repository(config_from(tmp_path, "")) is None
    repo = archive_repository(config_from(tmp_path, "backup_repository = 's3://prayer-backups/site/prod'\n"))
    assert (repo.bucket, repo.path, repo.endpoint, repo.port) == (
        "prayer-backups",
        "/site/prod",
        "s3.us-east-1.amazonaws.com",
        443,
    )
    assert (repo.region, repo.uri_style, repo.ca_bundle) == ("us-east-1", "host", "")


def test_an_s3_compatible_endpoint_with_a_port_path_style_and_a_ca_bundle_beside_the_config(tmp_path):
    (tmp_path / "s3-ca.pem").write_text(PEM)
    config = config_from(
        tmp_path,
        "backup_repository = 's3://archive'\nbackup_s3_endpoint = 'https://minio.example.org:9000'\n"
        "backup_s3_region = 'eu-west-1'\nbackup_s3_uri_style = 'path'\nbackup_s3_ca_bundle = 's3-ca.pem'\n",
    )
    repo = archive_repository(config)
    assert (repo.bucket, repo.path, repo.endpoint, repo.port) == ("archive", "/", "minio.example.org", 9000)
    assert (repo.region, repo.uri_style, repo.ca_bundle) == ("eu-west-1", "path", str(tmp_path / "s3-ca.pem"))


@pytest.mark.parametrize(
    "settings, message",
    [
        ("backup_repository = 'prayer-backups/x'\n", 'backup_repository must be "s3://BUCKET/PREFIX"'),
        ("backup_repository = 's3://Bad_Bucket/x'\n", "backup_repository must be"),
        ("backup_repository = 's3://ok-bucket/../x'\n", "backup_repository must be"),
        ("backup_repository = 's3://b-1/x'\nbackup_s3_endpoint = 'http://minio:9000'\n", "must use HTTPS"),
        ("backup_repository = 's3://b-1/x'\nbackup_s3_endpoint = 'minio:99999'\n", "backup_s3_endpoint must be a host"),
        ("backup_repository = 's3://b-1/x'\nbackup_s3_endpoint = 'a b'\n", "backup_s3_endpoint must be a host"),
        ("backup_repository = 's3://b-1/x'\nbackup_s3_region = 'EU West'\n", "backup_s3_region must be a region"),
        ("backup_repository = 's3://b-1/x'\nbackup_s3_uri_style = 'virtual'\n", 'must be "host" .* or "path"'),
        (
            "backup_repository = 's3://b-1/x'\nbackup_s3_ca_bundle = 'absent.pem'\n",
            "backup_s3_ca_bundle .* cannot be read",
        ),
        ("backup_s3_endpoint = 'minio:9000'\n", "backup_s3_endpoint set without backup_repository"),
        ("backup_s3_uri_style = 'path'\n", "backup_s3_uri_style set without backup_repository"),
        ("backup_full_schedule = 'Sun\\nExecStart=/bin/sh'\n", "backup_full_schedule must be a systemd calendar"),
        ("backup_diff_schedule = ''\n", "backup_diff_schedule must be a systemd calendar"),
        ("backup_full_keep = 0\n", "backup_full_keep must be at least 1"),
        ("backup_diff_keep = '7'\n", "backup_diff_keep must be a int"),
    ],
)
def test_bad_archive_settings_are_refused_in_one_line_naming_the_setting(tmp_path, settings, message):
    with pytest.raises(DeployError, match=message) as refused:
        config_from(tmp_path, settings)
    assert "\n" not in str(refused.value)


def test_pgbackrest_conf_encrypts_into_the_bucket_and_names_the_live_cluster(tmp_path):
    config = config_from(tmp_path, "backup_repository = 's3://prayer-backups/prod'\nbackup_full_keep = 3\n")
    conf = lines(render_pgbackrest_conf(config, SECRETS, pg_path="/var/lib/postgresql/15/main", pg_port=5433))
    assert conf == [
        "[global]",
        "repo1-type=s3",
        "repo1-path=/prod",
        "repo1-s3-bucket=prayer-backups",
        "repo1-s3-endpoint=s3.us-east-1.amazonaws.com",
        "repo1-s3-region=us-east-1",
        "repo1-s3-uri-style=host",
        "repo1-s3-key=AKIAEXAMPLE",
        "repo1-s3-key-secret=s3cr3t/key+value",
        "repo1-cipher-type=aes-256-cbc",
        "repo1-cipher-pass=a-long-passphrase",
        "repo1-retention-full=3",
        "repo1-retention-diff=7",
        "compress-type=lz4",
        "repo1-bundle=y",
        "process-max=2",
        "start-fast=y",
        "log-level-console=warn",
        "log-level-file=info",
        "lock-path=/var/lib/pgbackrest",
        "[prayer-room]",
        "pg1-path=/var/lib/postgresql/15/main",
        "pg1-port=5433",
    ]


def test_a_private_endpoint_gets_its_port_and_ca_file(tmp_path):
    (tmp_path / "ca.pem").write_text(PEM)
    config = config_from(
        tmp_path,
        "backup_repository = 's3://b-1/x'\nbackup_s3_endpoint = 's3.test:8443'\nbackup_s3_uri_style = 'path'\n"
        "backup_s3_ca_bundle = 'ca.pem'\n",
    )
    conf = lines(render_pgbackrest_conf(config, SECRETS, pg_path="/d"))
    assert "repo1-storage-port=8443" in conf and "repo1-storage-ca-file=/etc/pgbackrest/s3-ca.pem" in conf
    assert "repo1-s3-uri-style=path" in conf and "pg1-port=5432" in conf


def test_without_a_repository_nothing_is_rendered(tmp_path):
    with pytest.raises(DeployError, match="backup_repository is not set"):
        render_pgbackrest_conf(config_from(tmp_path, ""), SECRETS, pg_path="/d")


def test_postgresql_archives_every_wal_segment_with_pgbackrest_at_least_every_60_s(tmp_path):
    settings = lines(render_archive_settings(config_from(tmp_path, "backup_repository = 's3://b-1/x'\n")))
    assert settings == [
        "wal_level = replica",
        "archive_mode = on",
        "archive_command = '/usr/bin/pgbackrest --stanza=prayer-room archive-push %p'",
        "archive_timeout = 60",
    ]


def test_full_and_differential_backups_run_as_postgres_on_their_schedules(tmp_path):
    config = config_from(tmp_path, "backup_repository = 's3://b-1/x'\nbackup_diff_schedule = 'daily'\n")
    units = render_backup_units(config)
    assert sorted(units) == [
        "prayer-room-archive-diff.service",
        "prayer-room-archive-diff.timer",
        "prayer-room-archive-full.service",
        "prayer-room-archive-full.timer",
    ]
    full = lines(units["prayer-room-archive-full.service"])
    assert "ExecStart=/usr/bin/pgbackrest --stanza=prayer-room --type=full backup" in full
    assert "User=postgres" in full and "Type=oneshot" in full
    assert "ExecStart=/usr/bin/pgbackrest --stanza=prayer-room --type=diff backup" in lines(
        units["prayer-room-archive-diff.service"]
    )
    assert "OnCalendar=Sun *-*-* 01:30:00" in lines(units["prayer-room-archive-full.timer"])
    assert "OnCalendar=daily" in lines(units["prayer-room-archive-diff.timer"])
    assert "Persistent=true" in lines(units["prayer-room-archive-diff.timer"])


def test_secrets_come_from_the_environment_and_a_missing_one_is_named():
    environ = {"BACKUP_S3_KEY": "k", "BACKUP_S3_KEY_SECRET": "s", "BACKUP_CIPHER_PASS": "p"}
    assert ArchiveSecrets.from_environment(environ) == ArchiveSecrets("k", "s", "p")
    with pytest.raises(DeployError, match="needs BACKUP_S3_KEY_SECRET, BACKUP_CIPHER_PASS in the environment"):
        ArchiveSecrets.from_environment({"BACKUP_S3_KEY": "k"})
    with pytest.raises(DeployError, match="BACKUP_CIPHER_PASS must be printable ASCII without spaces"):
        ArchiveSecrets.from_environment({**environ, "BACKUP_CIPHER_PASS": "two\nlines"})


def test_a_restore_time_is_utc_unless_it_names_its_zone_and_must_lie_in_the_archive_window():
    assert parse_target_time("2026-12-05 06:10:18") == datetime(2026, 12, 5, 6, 10, 18, tzinfo=UTC)
    assert parse_target_time("2026-12-05 08:10:18+02").astimezone(UTC) == datetime(2026, 12, 5, 6, 10, 18, tzinfo=UTC)
    for bad in ("yesterday", "2026-12-05", "2026-12-05T06:10:18", "2026-12-05 06:10:18 CET"):
        with pytest.raises(DeployError, match='--to-time must be "YYYY-MM-DD HH:MM:SS\\[\\+TZ\\]"'):
            parse_target_time(bad)
    info = {"backup": [{"timestamp": {"start": 1796450700, "stop": 1796450789}}, {"timestamp": {"stop": 1796460000}}]}
    earliest, latest = restore_window(info)
    assert earliest == datetime.fromtimestamp(1796450789, UTC) and latest > earliest
    with pytest.raises(DeployError, match="the archive holds no backup yet"):
        restore_window({"backup": []})


def test_the_daily_restore_test_restores_into_a_scratch_instance_and_records_the_row_counts(tmp_path):
    config = config_from(tmp_path, "backup_repository = 's3://b-1/x'\nbackup_verify_schedule = '*-*-* 05:00:00'\n")
    script = render_verify_script(config, pg_bin="/usr/lib/postgresql/15/bin", live_port=5433)
    restore = '/usr/bin/pgbackrest --stanza=prayer-room --archive-mode=off --type=default restore --pg1-path="$scratch"'
    assert restore in script.splitlines()
    assert "scratch=/var/lib/postgresql/prayer-room-archive-verify" in script.splitlines()
    assert "listen_addresses = ''" in script and "archive_mode = off" in script  # a socket only, archiving nothing
    assert 'live=$(psql -p 5433 -AtX -d prayer_room -c "$counts")' in script
    units = render_verify_units(config, data_directory="/var/lib/postgresql/15/main")
    assert "ExecStart=/bin/sh /usr/local/lib/prayer-room/archive-verify.sh" in lines(
        units["prayer-room-archive-verify.service"]
    )
    assert "User=postgres" in lines(units["prayer-room-archive-verify.service"])
    assert "OnCalendar=*-*-* 05:00:00" in lines(units["prayer-room-archive-verify.timer"])


def exposure(tmp_path: Path, name: str, unit: str) -> float:
    """`systemd-analyze security`'s overall exposure of the unit file `unit` (0 is best, 10 is unsandboxed)."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (the systemd package; .ci/setup.d/25-provision.sh)")
    (tmp_path / name).write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=50", "--no-pager", name],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    return float(result.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])


def test_the_archive_units_are_sandboxed_writing_pgbackrests_directories_only(tmp_path):
    config = config_from(tmp_path, "backup_repository = 's3://b-1/x'\n")
    units = {**render_backup_units(config), **render_verify_units(config, data_directory="/var/lib/postgresql/17/main")}
    services = {name: lines(text) for name, text in units.items() if name.endswith(".service")}
    for name, unit in services.items():
        assert "CapabilityBoundingSet=" in unit and "NoNewPrivileges=yes" in unit and "PrivateTmp=yes" in unit
        assert "ProtectSystem=strict" in unit and "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in unit
        # RemoveIPC=yes would remove the live PostgreSQL's shared memory (its user's) when the unit stops.
        assert not [line for line in unit if line.startswith("RemoveIPC")], name
    for kind in ("full", "diff"):
        unit = services[f"prayer-room-archive-{kind}.service"]
        assert "ReadWritePaths=/var/lib/pgbackrest /var/log/pgbackrest" in unit
        assert "SystemCallFilter=~@privileged @resources" in unit
    verify = services["prayer-room-archive-verify.service"]
    assert "ReadWritePaths=/var/lib/pgbackrest /var/log/pgbackrest /var/lib/postgresql" in verify
    assert "ReadOnlyPaths=/var/lib/postgresql/17/main" in verify  # the live cluster, beside the scratch copy
    assert "jit = off" in render_verify_script(config, pg_bin="/usr/lib/postgresql/17/bin")  # MemoryDenyWriteExecute
    assert "lock-path=/var/lib/pgbackrest" in lines(render_pgbackrest_conf(config, SECRETS, pg_path="/d"))
    for name in services:  # 9.2 unsandboxed (systemd 252), 9.0 (257)
        assert exposure(tmp_path, name, units[name]) <= 2.0, name


def test_secrets_come_from_the_environment_then_the_secrets_file_then_the_server(tmp_path):
    secrets_file = tmp_path / "deploy.secrets"
    secrets_file.write_text("# the archive\nBACKUP_S3_KEY = file-key\nBACKUP_CIPHER_PASS=file-pass\nOTHER=x\n")
    on_server = secrets_from_conf(
        "[global]\nrepo1-s3-key=old-key\nrepo1-s3-key-secret=old-secret\nrepo1-cipher-pass=old\n"
    )
    assert on_server == {"BACKUP_S3_KEY": "old-key", "BACKUP_S3_KEY_SECRET": "old-secret", "BACKUP_CIPHER_PASS": "old"}
    chosen, generated = choose_secrets({"BACKUP_S3_KEY": "env-key", "PATH": "/bin"}, secrets_file, on_server)
    assert chosen == ArchiveSecrets("env-key", "old-secret", "file-pass") and not generated
    with pytest.raises(DeployError, match="needs BACKUP_S3_KEY_SECRET in the environment"):
        choose_secrets({}, tmp_path / "absent", {"BACKUP_S3_KEY": "k"})
    (tmp_path / "bad").write_text("no equals sign\n")
    with pytest.raises(DeployError, match="bad:1: expected KEY=value"):
        choose_secrets({}, tmp_path / "bad", {})


def test_without_a_passphrase_anywhere_one_is_generated_and_saved_in_the_secrets_file_only(tmp_path):
    secrets_file = tmp_path / "deploy.secrets"
    secrets_file.write_text("BACKUP_S3_KEY=k")
    environ = {"BACKUP_S3_KEY_SECRET": "s"}
    chosen, generated = choose_secrets(environ, secrets_file, {})
    assert generated and len(chosen.cipher_pass) >= 40
    assert secrets_file.read_text() == f"BACKUP_S3_KEY=k\nBACKUP_CIPHER_PASS={chosen.cipher_pass}\n"
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    assert choose_secrets(environ, secrets_file, {}) == (chosen, False)  # the next provision reuses it


def test_the_secrets_file_is_the_one_beside_the_config_file_read_and_the_db_host_installs_pgbackrest(tmp_path):
    elsewhere = tmp_path / "ops"
    elsewhere.mkdir()
    config = config_from(elsewhere, "backup_repository = 's3://prayer-backups/site'\n")
    assert config.secrets_file == elsewhere / "deploy.secrets"
    assert load_config(tmp_path / "missing.toml").secrets_file == tmp_path / "deploy.secrets"
    assert "pgbackrest" in packages_for(config.for_host(config.site_hosts[0]) if config.site_hosts else config)
    assert "pgbackrest" not in packages_for(config_from(tmp_path, ""))
    with pytest.raises(DeployError, match="unknown setting.*config_file"):
        config_from(tmp_path, "config_file = '/etc/passwd'\n")


INFO = {
    "backup": [
        {
            "type": "full",
            "label": "20261205-060941F",
            "timestamp": {"start": 1796450981, "stop": 1796450989},
            "info": {"size": 23243356, "repository": {"delta": 4565792}},
            "archive": {"start": "000000020000000000000006", "stop": "000000020000000000000007"},
        },
        {
            "type": "diff",
            "label": "20261205-060941F_20261205-061058D",
            "timestamp": {"start": 1796451058, "stop": 1796451062},
            "info": {"size": 23243356, "repository": {"delta": 81234}},
            "archive": {"start": "000000020000000000000009", "stop": "000000020000000000000009"},
        },
    ],
    "archive": [{"min": "000000020000000000000004", "max": "00000002000000000000000A"}],
}


def test_fab_backups_lists_the_archives_backups_with_type_time_size_and_wal_range():
    assert format_backups(INFO) == [
        "full  2026-12-05 06:09:49 UTC  23.2 MB (4.6 MB in the bucket)  "
        "WAL 000000020000000000000006..000000020000000000000007  20261205-060941F",
        "diff  2026-12-05 06:11:02 UTC  23.2 MB (81.2 kB in the bucket)  "
        "WAL 000000020000000000000009..000000020000000000000009  20261205-060941F_20261205-061058D",
        "WAL archived: 000000020000000000000004..00000002000000000000000A",
    ]
    assert format_backups({"backup": [], "archive": []}) == ["the archive holds no backup yet"]


def test_status_alerts_on_a_late_backup_failing_wal_archiving_and_a_failed_or_missing_restore_test():
    now = 1796451062 + 3600
    archiver = {"last_archived_wal": "00000002000000000000000A", "last_archived_time": now - 40}
    verified = {"ok": True, "finished": now - 7200, "seconds": 25}
    assert format_archive_status(INFO, verified, archiver, now) == [
        "archive: newest backup 1.0 h old",
        "archive: newest WAL 00000002000000000000000A archived 40 s ago",
        "archive: last restore test passed 2.0 h ago in 25 s",
    ]
    late = format_archive_status(INFO, verified, archiver, now + 2 * 86400)
    assert late[0].startswith("ALERT archive: newest backup 49.0 h old") and late[2].startswith("ALERT")
    failing = {**archiver, "last_failed_wal": "00000002000000000000000B", "last_failed_time": now - 10}
    assert format_archive_status(INFO, verified, failing, now)[1].startswith("ALERT archive: WAL archiving failing")
    failed = {"ok": False, "finished": now - 60, "seconds": 3, "error": "the restore test failed (exit 1)"}
    assert format_archive_status(INFO, failed, archiver, now)[2].startswith(
        "ALERT archive: the last restore test failed"
    )
    assert format_archive_status({"backup": []}, None, {}, now) == [
        "ALERT archive: no backup yet",
        "ALERT archive: no restore test yet",
    ]


def test_the_restore_tests_row_counts_that_differ_are_named():
    same = {"restored": {"a": 1, "b": 2}, "live": {"a": 1, "b": 2}}
    assert count_differences(same) == []
    result = {"restored": {"a": 1}, "live": {"a": 3, "b": 2}}
    assert count_differences(result) == ["a: 3 rows live, 1 restored", "b: 2 rows live, not restored"]


FAB = Path(sys.executable).with_name("fab")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["restore", "--latest", "--yes"], "backup_repository is not set in the deploy config"),
        (["restore", "--to-time", "2026-12-01 10:00:00", "--yes"], "backup_repository is not set"),
        (["restore", "--to-time", "yesterday", "--yes"], '--to-time must be "YYYY-MM-DD HH:MM:SS[+TZ]"'),
        (["restore", "some.dump", "--latest"], "restore takes one of: a backup NAME"),
        (["backup", "--verify"], "backup_repository is not set in the deploy config: there is no archive to verify"),
    ],
)
def test_fab_restore_from_the_archive_and_backup_verify_refuse_in_one_line_before_any_host(tmp_path, args, message):
    config = tmp_path / "deploy.toml"
    config.write_text("[defaults]\n")
    command = [str(FAB), "-H", "root@192.0.2.1", *args, "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
