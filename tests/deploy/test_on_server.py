"""The on-server helpers as the kit sends them: one self-contained script each, run by a bare python3."""

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import backup
from deploy.errors import DeployError
from deploy.on_server import root_helper, script

HELPERS = ("app_helper", "root_helper")


def run(name: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """The helper's script under `python3 -I -c` (no kit, no project on sys.path), as root_helper runs on servers."""
    return subprocess.run(
        [sys.executable, "-I", "-c", script(name), *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


@pytest.mark.parametrize("name", HELPERS)
def test_each_helper_is_one_script_that_imports_nothing_of_the_kit(name, tmp_path):
    text = script(name)
    assert not [line for line in text.splitlines() if line.startswith(("from deploy", "import deploy"))]
    result = run(name, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--env-file" in result.stdout


def test_the_root_helper_lists_the_backups_oldest_first_with_the_server_clock(tmp_path):
    for name, created in (("b.dump", 200), ("a.dump", 100)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"name": name, "created": created}))
    (tmp_path / "stray.json").write_text("{}")
    result = run("root_helper", "backups", "--dir", str(tmp_path))
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["ok"] and [r["name"] for r in answer["backups"]] == ["a.dump", "b.dump"]
    assert isinstance(answer["now"], int)


def test_a_file_where_the_backups_directory_should_be_is_one_line_not_a_traceback(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("DATABASE_URL=postgres://u:p@127.0.0.1/db\n")
    (tmp_path / "backups").write_text("")
    for args in (("backups",), ("--env-file", str(env_file), "backup")):
        result = run("root_helper", *args, "--dir", str(tmp_path / "backups"))
        assert result.returncode == 1 and result.stderr == "", result.stderr
        error = json.loads(result.stdout.splitlines()[-1])["error"]
        assert error == f"the backups directory {tmp_path / 'backups'} cannot be used (Not a directory)", error


def test_the_root_helper_refuses_a_backup_without_a_postgres_url_and_writes_nothing(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("DATABASE_URL=sqlite:///db.sqlite3\n")
    backups = tmp_path / "backups"
    result = run("root_helper", "--env-file", str(env_file), "backup", "--dir", str(backups))
    assert result.returncode == 1
    assert "not a postgres:// URL" in json.loads(result.stdout.splitlines()[-1])["error"]
    assert list(backups.iterdir()) == []


def test_the_restore_s_password_file_escapes_the_password():
    assert root_helper.passfile_line("a:b\\c") == "*:*:*:*:a\\:b\\\\c\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="hands a directory to another user: needs root")
def test_the_restore_runs_as_the_unprivileged_user_with_the_password_in_a_file_of_its_own():
    nobody = pwd.getpwnam("nobody")
    env = {
        "PGHOST": "db", "PGPORT": "5432", "PGUSER": "owner", "PGPASSWORD": "s3:cret", "PGDATABASE": "app",
        "PGSSLMODE": "verify-full", "SECRET_KEY": "not for pg_restore", "PATH": "/home/app/bin:/usr/bin",
    }  # fmt: skip
    workdir, run = root_helper.unprivileged("nobody", env)
    try:
        passfile = Path(run["env"]["PGPASSFILE"])
        for path, mode in ((Path(workdir), 0o700), (passfile, 0o600)):
            info = path.stat()
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (nobody.pw_uid, nobody.pw_gid, mode)
        assert passfile.read_text() == "*:*:*:*:s3\\:cret\n"
        assert run["env"] == {
            "PGHOST": "db", "PGPORT": "5432", "PGUSER": "owner", "PGDATABASE": "app", "PGSSLMODE": "verify-full",
            "PGPASSFILE": str(passfile), "HOME": workdir, "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8",
        }  # fmt: skip
        assert (run["user"], run["group"], run["extra_groups"]) == (nobody.pw_uid, nobody.pw_gid, [])
        who = subprocess.run(["id", "-u"], capture_output=True, text=True, **run)
        assert who.stdout.strip() == str(nobody.pw_uid)
    finally:
        shutil.rmtree(workdir)
    with pytest.raises(ValueError, match="root is root"):
        root_helper.unprivileged("root", env)


def test_deploy_and_rollback_refuse_in_one_line_while_an_interrupted_restores_schema_is_set_aside(monkeypatch):
    found = {
        "schema": "public_before_restore_1000",
        "action": "found",
        "public_relations": 0,
        "note": "a restore was interrupted at 1970-01-01 00:16:40 UTC before it committed (public is empty): schema "
        "public_before_restore_1000 holds the database as it was before that restore",
    }
    monkeypatch.setattr(backup, "interrupted_restore", lambda server: found)
    with pytest.raises(DeployError) as refused:
        backup.refuse_after_interrupted_restore(None, "deploy")
    assert str(refused.value) == (
        "deploy refused, nothing changed: a restore was interrupted at 1970-01-01 00:16:40 UTC before it committed "
        "(public is empty): schema public_before_restore_1000 holds the database as it was before that restore; run "
        "`fab restore NAME --yes` again: it first puts public_before_restore_1000 back as public, then restores NAME."
    )
    assert "\n" not in str(refused.value)
    monkeypatch.setattr(backup, "interrupted_restore", lambda server: {})
    assert backup.refuse_after_interrupted_restore(None, "rollback") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="runs psql as another user: needs root")
def test_a_restore_stopped_between_its_transactions_is_settled_with_a_note(tmp_path):
    """A restore replaces `public` in three transactions (set it aside, pg_restore, drop the aside); the states a kill
    between them leaves, settled by the helper's `recover` against a real PostgreSQL."""
    from tests.deploy.target import postgres_client_bin
    from tests.support.stack import Database

    database = Database().create()
    env_file = tmp_path / "env"
    env_file.write_text(f"DATABASE_URL={database.url}\n")
    pg_bin = postgres_client_bin()

    def recover(*args: str) -> dict:
        argv = ["--env-file", str(env_file), "recover", "--dir", str(tmp_path), "--as-user", "nobody", *args]
        result = run("root_helper", *argv, *(["--pg-bin", pg_bin] if pg_bin else []))
        answer = json.loads(result.stdout.splitlines()[-1])
        assert answer["ok"], answer
        return answer["interrupted"]

    def state() -> tuple[list, list]:
        schemas = database.query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'public%%' ORDER BY 1")
        return [row[0] for row in schemas], database.query("SELECT id FROM public.notes ORDER BY id")

    try:
        database.query("CREATE TABLE public.notes (id int); INSERT INTO public.notes VALUES (1), (2), (3)")
        before = state()
        assert recover() == {}  # nothing interrupted: nothing done

        assert recover("--check") == {}
        # A schema the app role (the database's owner) made with the prefix but no epoch seconds is none of a
        # restore's: not reported (its name would reach fab's messages and psql), deploys not refused.
        forged = "public_before_restore_1 CASCADE; DROP SCHEMA public"
        database.query(f'CREATE SCHEMA "{forged}"')
        assert recover("--check") == {} and recover() == {}
        database.query(f'DROP SCHEMA "{forged}"')
        # Killed after the first transaction: the database aside, public empty (pg_restore never committed).
        database.query("ALTER SCHEMA public RENAME TO public_before_restore_1000; CREATE SCHEMA public")
        schemas = (
            "SELECT nspname, (SELECT count(*) FROM pg_class WHERE relnamespace = n.oid) FROM pg_namespace n ORDER BY 1"
        )
        aside = database.query(schemas)
        found = recover("--check")  # what deploy, rollback and status ask: found, nothing changed
        assert found == {
            "schema": "public_before_restore_1000",
            "action": "found",
            "public_relations": 0,
            "note": "a restore was interrupted at 1970-01-01 00:16:40 UTC before it committed (public is empty): "
            "schema public_before_restore_1000 holds the database as it was before that restore",
        }, found
        assert "run `fab restore NAME --yes` again" in backup.interrupted_restore_fix(found)
        assert database.query(schemas) == aside
        settled = recover()
        assert settled["action"] == "put back" and "public_before_restore_1000" in settled["note"], settled
        assert state() == before

        # Killed after pg_restore committed: both kept (public may hold newer writes), the operator told how to drop.
        database.query("ALTER SCHEMA public RENAME TO public_before_restore_2000; CREATE SCHEMA public")
        database.query("CREATE TABLE public.notes (id int); INSERT INTO public.notes VALUES (9)")
        found = recover("--check")
        assert found["public_relations"] == 1 and "after it had committed" in found["note"], found
        assert "DROP SCHEMA public_before_restore_2000 CASCADE" in backup.interrupted_restore_fix(found)
        kept = recover()
        assert kept["action"] == "kept" and "DROP SCHEMA public_before_restore_2000 CASCADE" in kept["note"], kept
        assert state() == (["public", "public_before_restore_2000"], [(9,)])
        # The kit's own failed restore (its aside named): put back whatever public holds.
        assert recover("--put-back", "public_before_restore_2000")["action"] == "put back"
        assert state() == before
        refused = run("root_helper", "--env-file", str(env_file), "recover", "--dir", str(tmp_path), "--as-user",
                      "nobody", "--put-back", "public; DROP TABLE x")  # fmt: skip
        assert "is not public_before_restore_<epoch seconds>" in json.loads(refused.stdout.splitlines()[-1])["error"]
    finally:
        database.drop()
