"""The history without a server: the table `fab history` prints, and `recorded` appending through the real shell
command into a log in a temporary directory."""

import json
import subprocess
from dataclasses import dataclass, replace

import pytest

from deploy import history
from deploy.commands import history as commands
from deploy.config import DeployConfig
from deploy.errors import DeployError

DEPLOY = {
    "event": "deploy",
    "host": "203.0.113.7",
    "time": "2026-12-05T09:31:02Z",
    "who": "ann@laptop",
    "author": "Ann <ann@example.org>",
    "result": "ok",
    "message": "",
    "release": "20261205093050-0123456789ab",
    "commit": "0123456",
    "migrations": ["prayer_room_api.0007_topics"],
    "backup": "20261205093101-deploy-20261205093050-0123456789ab.dump",
    "seconds": 41.23,
}
ROLLBACK = {
    **DEPLOY,
    "event": "rollback",
    "time": "2026-12-05T09:40:00Z",
    "who": "bob@ci",
    "author": "",
    "result": "failed",
    "message": "203.0.113.7 has no verified release older than 2026... to roll back to.",
    "release": None,
    "commit": None,
    "migrations": None,
    "backup": None,
    "detail": "from 20261205093050-0123456789ab",
    "seconds": 2,
}


def test_the_table_has_one_row_per_record_and_a_failures_error_under_it():
    lines = history.format_table([DEPLOY, ROLLBACK]).splitlines()
    assert lines[0].split() == ["WHEN", "(UTC)", "EVENT", "RESULT", "TIME", "WHO", "WHAT"]
    assert lines[1].startswith("2026-12-05 09:31:02  deploy    ok      41.2 s  ann@laptop (Ann <ann@example.org>)  ")
    assert lines[1].endswith(
        "20261205093050-0123456789ab; commit 0123456; migrations prayer_room_api.0007_topics; "
        "backup 20261205093101-deploy-20261205093050-0123456789ab.dump"
    )
    assert lines[2].startswith("2026-12-05 09:40:00  rollback  failed  2.0 s   bob@ci ")
    assert lines[2].endswith("from 20261205093050-0123456789ab")
    assert lines[3] == " " * 19 + "  error: " + ROLLBACK["message"]
    assert len(lines) == 4


def test_many_migrations_are_counted_with_the_first_and_the_last():
    many = {**DEPLOY, "migrations": [f"app.{n:04}" for n in range(1, 58)]}
    assert "; 57 migrations app.0001 ... app.0057; backup " in history.format_table([many])


def test_an_empty_history_says_so_and_a_broken_record_is_still_a_row():
    assert history.format_table([]).startswith("no history yet")
    assert "?" in history.format_table([{"event": "?", "message": "unreadable line"}]).splitlines()[1]


def test_an_exception_is_kept_as_one_line():
    assert history.one_line(DeployError("first\n  second\n")) == "first | second"
    assert history.one_line(KeyboardInterrupt()) == "interrupted"
    assert history.one_line(ValueError()) == "ValueError"


@dataclass
class LocalServer:
    """A stand-in for the primary that runs root's commands in a local shell."""

    config: DeployConfig

    def root(self, command: str, *, what: str, **kwargs):
        result = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
        if result.returncode:
            raise DeployError(f"{what} failed: {result.stderr}")
        return result


@dataclass
class FakeSite:
    config: DeployConfig
    server: LocalServer | None
    name: str = "203.0.113.7"

    def history_server(self):
        return self.server


def test_recorded_appends_ok_and_failed_runs_with_their_duration(tmp_path):
    config = replace(DeployConfig(), root=str(tmp_path / "srv"))
    site = FakeSite(config, LocalServer(config))
    with history.recorded(site, "deploy", commit="abc1234") as record:
        record["release"] = "20261205000000-abc"
    with pytest.raises(DeployError), history.recorded(site, "maintenance on", detail="it's `back` at $10 \\o/"):
        raise DeployError("nginx said no\nreally")
    log = tmp_path / "srv" / "log" / "history.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["event"], r["result"], r["message"]) for r in records] == [
        ("deploy", "ok", ""),
        ("maintenance on", "failed", "nginx said no | really"),
    ]
    assert records[0]["release"] == "20261205000000-abc" and records[0]["commit"] == "abc1234"
    assert records[1]["detail"] == "it's `back` at $10 \\o/"  # operator text reaches the log as it was
    assert all(r["who"] == history.who() and isinstance(r["seconds"], float) for r in records)
    assert {"event", "host", "result", "message", "release", "time"} <= set(records[0])
    assert (log.stat().st_mode & 0o777, log.parent.stat().st_mode & 0o777) == (0o600, 0o750)
    assert [r["event"] for r in history.read(site.server, 1)] == ["maintenance on"]


def test_a_history_that_cannot_be_written_warns_and_the_outcome_stands(tmp_path, capsys):
    config = replace(DeployConfig(), root=str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a directory")
    with history.recorded(FakeSite(config, LocalServer(config)), "provision"):
        pass
    assert "WARNING: provision was not recorded in the history" in capsys.readouterr().err
    with history.recorded(FakeSite(config, None), "provision"):  # no host reached: nothing to write, no warning
        pass
    assert capsys.readouterr().err == ""


def test_the_read_command_prints_nothing_without_a_log():
    assert subprocess.run(["sh", "-c", commands.last("/nonexistent/history.jsonl", 5)]).returncode == 0


def test_the_git_author_is_the_repositorys_own_identity_else_the_operators_global_one(tmp_path, monkeypatch):
    home, repo = tmp_path / "home", tmp_path / "repo"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    subprocess.run(["git", "init", "--quiet", str(repo)], check=True)
    assert history.git_author(repo) == ""  # no identity anywhere: the WHO column shows user@host only
    (home / ".gitconfig").write_text("[user]\n\tname = Ann Operator\n\temail = ann@example.org\n")
    assert history.git_author(repo) == "Ann Operator <ann@example.org>"
    subprocess.run(["git", "-C", str(repo), "config", "user.email", "ann@work.example"], check=True)
    assert history.git_author(repo) == "Ann Operator <ann@work.example>"
    assert history.git_author(tmp_path / "no-such-directory") == ""
