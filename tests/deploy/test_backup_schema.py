"""Backups and schema checks without a server: the lists and warnings fab prints, the refusals, the config."""

import subprocess
from dataclasses import replace

import pytest

from deploy import backup, schema
from deploy.commands.backup import timer_state
from deploy.config import load_config
from deploy.errors import DeployError

NOW = 1_800_000_000


def record(name: str, kind: str, hours_ago: float, size: int = 133_446) -> dict:
    return {"name": name, "kind": kind, "release": "20261202125448-7a91fae09efa", "size": size,
            "created": int(NOW - hours_ago * 3600), "sha256": "0" * 64}  # fmt: skip


def test_the_list_is_newest_first_with_size_and_age():
    listed = backup.format_list([record("a.dump", "daily", 30), record("b.dump", "deploy", 0.5)], NOW)
    lines = listed.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "RELEASE", "SIZE", "AGE"]
    assert lines[1].startswith("b.dump") and "deploy" in lines[1] and "30 min ago" in lines[1]
    assert lines[2].startswith("a.dump") and "130.3 kB" in lines[2] and "30 h ago" in lines[2]
    assert "fab backup" in backup.format_list([], NOW)


@pytest.mark.parametrize(
    "found, expected, warned",
    [
        ([], "no backup on the server", True),
        ([record("a.dump", "daily", 2)], "last a.dump (daily), 2 h ago, 1 kept", False),
        ([record("a.dump", "daily", 25)], "older than a day", True),
        ([record("a.dump", "daily", 50), record("b.dump", "manual", 1)], "last b.dump (manual)", False),
    ],
)
def test_status_warns_without_a_backup_of_the_last_day(found, expected, warned):
    line = backup.freshness(found, NOW)
    assert expected in line and ("WARNING" in line) == warned


WAITING = backup.Timer(loaded=True, enabled=True, active=True, next_run=NOW + 5 * 3600, now=NOW)


def test_the_timer_state_is_read_from_systemctl_show(tmp_path):
    """The command runs here with stand-ins for systemctl, as systemd 257 answers (its next run a date, whatever
    --timestamp says), and for a server without systemd."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl = bin_dir / "systemctl"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TZ": "UTC"}

    def state(script: str) -> backup.Timer | None:
        systemctl.write_text(f"#!/bin/sh\n{script}\n")
        systemctl.chmod(0o755)
        out = subprocess.run(["sh", "-c", timer_state()], env=env, capture_output=True, text=True, check=True).stdout
        found = backup.parse_timer(out)
        return found and replace(found, now=NOW)

    waiting = state(
        'case "$*" in *--value*) echo "Fri 2027-01-15 13:00:00 UTC";; '
        "*) printf 'LoadState=loaded\\nActiveState=active\\nUnitFileState=enabled\\n';; esac"
    )
    assert waiting == backup.Timer(loaded=True, enabled=True, active=True, next_run=1_800_018_000, now=NOW)
    missing = state(
        'case "$*" in *--value*) echo;; '
        "*) printf 'LoadState=not-found\\nActiveState=inactive\\nUnitFileState=\\n';; esac"
    )
    assert missing == backup.Timer(loaded=False, enabled=False, active=False, next_run=None, now=NOW)
    assert state("echo 'System has not been booted with systemd as init system (PID 1).' >&2; exit 1") is None


@pytest.mark.parametrize(
    "timer, expected",
    [
        # Right after `fab provision`: the timer waits for its first run; nothing is wrong.
        (WAITING, "backups: none yet; the daily timer takes the first in 5 h (`fab backup` takes one now)"),
        (backup.Timer(True, True, True, None, NOW), "backups: none yet; the daily timer takes the first ("),
        (backup.Timer(False, False, False, None, NOW), "WARNING none on the server and the daily timer is not "
         "installed: `fab provision` installs and starts it"),
        (backup.Timer(True, True, False, None, NOW), "the daily timer is not active: `fab provision`"),
        (backup.Timer(True, False, True, None, NOW), "the daily timer is not enabled: `fab provision`"),
        (None, "WARNING no backup on the server; run `fab backup` (and `fab provision` for the daily timer)"),
    ],
)  # fmt: skip
def test_no_backup_names_the_provision_hint_only_when_the_timer_is_not_waiting(timer, expected):
    line = backup.freshness([], NOW, timer)
    assert line.startswith(expected) if expected.startswith("backups:") else expected in line, line
    assert ("WARNING" in line) == (timer is None or not timer.waiting), line
    assert ("fab provision" in line) == (timer is None or not timer.waiting), line


def test_a_fresh_backup_still_warns_of_a_stopped_timer():
    fresh = [record("a.dump", "daily", 2)]
    assert "WARNING" not in backup.freshness(fresh, NOW, WAITING)
    stopped = backup.freshness(fresh, NOW, backup.Timer(True, True, False, None, NOW))
    assert stopped.endswith("1 kept; WARNING the daily timer is not active: `fab provision` installs and starts it")


def test_a_refused_rollback_lists_the_migrations_and_the_three_choices():
    message = schema.refuse_rollback(
        "r1", "r2", ("prayer_room_api.0007_prayerrequest_language",), "20261202-deploy-r2.dump"
    )
    assert "prayer_room_api.0007_prayerrequest_language" in message and "r1 does not have" in message
    assert "--unapply" in message and "r2's code" in message
    assert "--restore 20261202-deploy-r2.dump" in message and "LOST" in message
    assert "--keep-schema" in message


UNSAFE_ADD = {"migration": "app.0007_x", "operation": "Add field x", "problem": "NOT NULL", "fix": "use db_default"}


def report(new: tuple[str, ...], unsafe: tuple[dict, ...] = ()) -> schema.SchemaReport:
    return schema.SchemaReport(applied=(), unknown=(), new=new, unsafe=unsafe)


def test_the_deploy_flags_unsafe_migrations_only_against_a_live_release():
    found = report(("app.0001_initial", "app.0007_x"), (UNSAFE_ADD,))
    assert schema.check_lines(found, "r1") == [
        "   new migrations: app.0001_initial, app.0007_x",
        "   UNSAFE app.0007_x: NOT NULL",
    ]
    # The first deploy: no release runs on the old schema, so nothing is unsafe for one.
    assert schema.check_lines(found, None) == ["   new migrations: app.0001_initial, app.0007_x"]
    assert schema.check_lines(report(()), "r1") == ["   new migrations: none"]


def test_a_deploy_backs_up_before_migrating_only_data_a_live_release_wrote():
    new = report(("app.0007_x",))
    assert schema.backup_skipped(new, "r1") is None  # new migrations onto the live release's data: a backup
    assert schema.backup_skipped(new, None).startswith("no backup: no live release yet")  # the first deploy
    assert schema.backup_skipped(report(()), "r1").startswith("no backup: no new migrations")


def test_a_refused_migration_names_the_operation_and_the_fix():
    unsafe = ({"migration": "app.0007_x", "operation": "Add field x", "problem": "NOT NULL", "fix": "use db_default"},)
    message = schema.refuse_unsafe(unsafe, "r1")
    assert "break r1" in message and "app.0007_x: Add field x: NOT NULL; fix: use db_default." in message
    assert "--maintenance" in message


@pytest.mark.parametrize(
    "setting, error",
    [
        ("backup_keep = 0", "backup_keep must be at least 1"),
        ('backup_dir = "backups"', "backup_dir must be an absolute directory"),
    ],
)
def test_backup_settings_are_checked(tmp_path, setting, error):
    path = tmp_path / "deploy.toml"
    path.write_text(f"[defaults]\n{setting}\n")
    with pytest.raises(DeployError, match=error):
        load_config(path)


def test_backup_settings_reach_the_layout(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text('[defaults]\nbackup_dir = "/srv/backups"\nbackup_keep = 3\n')
    config = load_config(path)
    assert str(config.layout.backups) == "/srv/backups" and config.backup_keep == 3
