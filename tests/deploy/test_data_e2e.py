"""Deploys that keep the data, over real SSH to a real supervisord, PostgreSQL and nginx: backups and restore,
migrations the live release cannot live with, rollbacks that know the schema, verification that writes work.

The tests share one target and run in file order: each starts from the release and schema the previous one left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.target import REPO, Clone, DeployTarget, http_get, unavailable

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

MODELS = Path("project/prayer_room_api/models.py")
MIGRATIONS = Path("project/prayer_room_api/migrations")
TABLE = "prayer_room_api_prayerrequest"
ARTIFACTS = REPO / "test-artifacts"
figures: dict[str, object] = {}


@pytest.fixture(scope="module")
def target():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="prayer-room-data-e2e-"))
    target = DeployTarget(workdir)
    try:
        target.start()
        with (target.srv / "shared" / "env").open("a") as env:
            env.write("THROTTLE_SUBMIT=1000000/hour\n")  # the POST loops are one client
        yield target
    finally:
        target.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if figures:
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "data-e2e-figures.json").write_text(json.dumps(figures, indent=1) + "\n")


@pytest.fixture(scope="module")
def clone(target):
    return Clone(target.workdir / "repo")


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def refused(result) -> str:
    """The error of a refused command: 'error: ' and its lines joined by ' | ', no traceback."""
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def post_request(target: DeployTarget, content: str = "please pray for the harvest") -> tuple[int | None, str]:
    """POST /api/requests/ through the front server, as the site's form does."""
    body = json.dumps({"type": "prayer", "content": content, "location": "chapel"}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{target.nginx_port}/api/requests/",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return None, str(exc)


@dataclass
class Traffic:
    """GETs of /health/ and POSTs of a request through the front server, back to back, while a block runs."""

    target: DeployTarget
    answers: dict[str, list[int | None]] = field(default_factory=lambda: {"GET": [], "POST": []})
    failures: list[str] = field(default_factory=list)
    headers_503: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Traffic:
        self._threads = [threading.Thread(target=self._run, args=(m,), daemon=True) for m in ("GET", "POST")]
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, method: str) -> None:
        while not self._stop.is_set():
            if method == "GET":
                status, body = self._get_with_headers()
            else:
                status, body = post_request(self.target, "during a deploy")
            self.answers[method].append(status)
            if status not in (200, 201):
                self.failures.append(f"{method} {status}: {body[:200]}")
            time.sleep(0.02)

    def _get_with_headers(self) -> tuple[int | None, str]:
        try:
            with urllib.request.urlopen(self.target.front_url, timeout=10) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 503:
                self.headers_503.append(exc.headers.get("Retry-After", ""))
            return exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            return None, str(exc)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def count(self, method: str, status: int | None) -> int:
        return sum(1 for s in self.answers[method] if s == status)


def rows(target: DeployTarget) -> list[tuple]:
    return target.database.query(f"SELECT * FROM {TABLE} ORDER BY id")


def columns(target: DeployTarget) -> set[str]:
    found = target.database.query("SELECT column_name FROM information_schema.columns WHERE table_name = %s", (TABLE,))
    return {name for (name,) in found}


def applied(target: DeployTarget) -> set[str]:
    return {f"{app}.{name}" for app, name in target.database.query("SELECT app, name FROM django_migrations")}


def step_seconds(out: str, name: str) -> float:
    found = re.search(rf"ok  {re.escape(name)} \(([\d.]+) s\)", out)
    assert found, f"no step {name!r} in:\n{out}"
    return float(found.group(1))


def commit_model_change(clone: Clone, field_line: str, migration_name: str, message: str) -> str:
    """Add `field_line` to PrayerRequest and commit it with the migration makemigrations writes for it."""
    models = clone.path / MODELS
    text = models.read_text()
    anchor = "    response_notified_at = models.DateTimeField("
    assert anchor in text
    models.write_text(text.replace(anchor, f"    {field_line}\n{anchor}", 1))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "prayer_room_api.settings.local",
        "DATABASE_URL": f"sqlite:///{clone.path / 'makemigrations.sqlite3'}",
    }
    subprocess.run(
        [sys.executable, "project/manage.py", "makemigrations", "prayer_room_api", "--name", migration_name],
        cwd=clone.path, env=env, check=True, capture_output=True,
    )  # fmt: skip
    (clone.path / "makemigrations.sqlite3").unlink(missing_ok=True)
    new = [p for p in (clone.path / MIGRATIONS).glob(f"*_{migration_name}.py")]
    assert len(new) == 1, new
    clone.git("add", str(MODELS), str(new[0].relative_to(clone.path)))
    clone.git("commit", "--quiet", "-m", message)
    return f"prayer_room_api.{new[0].stem}"


def test_first_deploy_then_a_backup_and_restore_round_trip(target, clone, tmp_path):
    ok(target.fab("deploy", repo=clone.path))
    target.database.query(
        "INSERT INTO prayer_room_api_location (name, slug, is_active, created_at)"
        " VALUES ('Chapel', 'chapel', true, now())"
    )
    target.database.query(
        f"INSERT INTO {TABLE} (content, name, type, location_id, created_at, updated_at, prayer_count, response) "
        "SELECT 'request ' || i, 'Anonymous', 'prayer', (SELECT id FROM prayer_room_api_location), now(), now(), "
        "mod(i, 7), '' FROM generate_series(1, 10000) AS i"
    )
    before = rows(target)
    assert len(before) == 10000
    started = time.monotonic()
    out = ok(target.fab("backup", "--download", str(tmp_path)))
    figures["backup_10000_requests_fab_seconds"] = round(time.monotonic() - started, 2)
    name = out.split(":")[0].strip()
    assert name.endswith(f"-manual-{target.live_release()}.dump"), out
    backups = target.workdir / "backups"
    assert oct(backups.stat().st_mode & 0o777) == "0o700" and (backups / name).stat().st_uid == 0
    record = json.loads((backups / f"{name}.json").read_text())
    figures["backup_10000_requests_pg_dump_seconds"] = record["seconds"]
    figures["backup_10000_requests_bytes"] = record["size"]
    downloaded = tmp_path / name
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == record["sha256"]
    listed = ok(target.fab("backups"))
    assert name in listed and "manual" in listed and target.live_release() in listed
    assert re.search(r"backups: last \S+ \(manual\), \d+ s ago, 1 kept", ok(target.fab("status")))

    target.database.query(f"DELETE FROM {TABLE} WHERE mod(id, 3) = 0")
    target.database.query(f"UPDATE {TABLE} SET prayer_count = 999 WHERE mod(id, 5) = 0")
    assert "every write made since is lost" in refused(target.fab("restore", name))
    assert len(rows(target)) < 10000  # the refusal changed nothing
    started = time.monotonic()
    out = ok(target.fab("restore", name, "--yes"))
    figures["restore_10000_requests_fab_seconds"] = round(time.monotonic() - started, 2)
    figures["restore_10000_requests_pg_restore_seconds"] = float(re.search(r"restored in ([\d.]+) s", out).group(1))
    assert rows(target) == before  # row by row
    assert "maintenance window" in out and "verify: migrate --check" in out
    assert set(target.states().values()) == {"RUNNING"}
    kinds = [json.loads(p.read_text())["kind"] for p in backups.glob("*.json")]
    assert sorted(kinds) == ["manual", "restore"]  # the state it replaced was backed up first
    assert post_request(target)[0] == 201


def test_an_incompatible_migration_is_refused_then_deployed_in_a_maintenance_window(target, clone):
    live, releases = target.live_release(), target.releases()
    migration = commit_model_change(
        clone, 'language = models.CharField(max_length=8, default="en")', "prayerrequest_language", "language"
    )
    line = refused(target.fab("deploy", repo=clone.path))
    figures["refused_migration_message"] = line
    assert migration in line and "NOT NULL column prayerrequest.language without a database default" in line
    assert "use db_default='en'" in line and "or null=True" in line and "split into two deploys" in line
    assert "--maintenance" in line and f"{live} keeps serving" in line
    assert target.releases() == releases and "language" not in columns(target)

    with Traffic(target) as traffic:
        out = ok(target.fab("deploy", "--maintenance", repo=clone.path))
        time.sleep(1)
    figures["maintenance_window_seconds"] = step_seconds(out, "maintenance window (the site answered 503)")
    figures["maintenance_answers"] = {
        method: {str(status): answers.count(status) for status in set(answers)}
        for method, answers in traffic.answers.items()
    }
    assert "language" in columns(target) and migration in applied(target)
    assert traffic.count("GET", 503) > 0 and set(traffic.headers_503) == {"30"}
    unexpected = [f for f in traffic.failures if not f.split()[1] == "503:"]
    assert unexpected == [], unexpected[:5]  # 503 with Retry-After in the window, never a 500 or 502
    assert "deploy-" in "".join(p.name for p in (target.workdir / "backups").iterdir())
    assert post_request(target)[0] == 201


def test_rollback_is_refused_while_the_database_has_newer_migrations_then_unapplies_them(target, clone):
    live = target.live_release()
    [migration] = [m for m in applied(target) if m.endswith("_prayerrequest_language")]
    line = refused(target.fab("rollback"))
    figures["refused_rollback_message"] = line
    assert migration in line and "does not have" in line
    assert "--unapply" in line and "--keep-schema" in line and "LOST" in line
    assert re.search(r"--restore \S+-deploy-" + re.escape(live) + r"\.dump", line), line
    assert target.live_release() == live

    out = ok(target.fab("rollback", "--unapply"))
    assert f"unapply {migration}" in out
    assert "language" not in columns(target) and migration not in applied(target)
    assert target.live_release() != live
    status, body = post_request(target)
    assert status == 201, body
    clone.revert_head()


def test_a_compatible_migration_deploys_without_a_failed_request(target, clone):
    migration = commit_model_change(
        clone,
        'language = models.CharField(max_length=8, default="en", db_default="en")',
        "prayerrequest_language_db_default",
        "language with a database default",
    )
    with Traffic(target) as traffic:
        out = ok(target.fab("deploy", repo=clone.path))
        time.sleep(1)
    figures["compatible_deploy"] = {
        method: {str(status): answers.count(status) for status in set(answers)}
        for method, answers in traffic.answers.items()
    }
    assert "maintenance" not in out and migration in applied(target)
    assert traffic.failures == [], traffic.failures[:5]  # the old release writes through the new schema
    assert len(traffic.answers["POST"]) > 20 and len(traffic.answers["GET"]) > 20


def test_a_failed_verification_unapplies_the_migrations_the_deploy_applied(target, clone):
    live = target.live_release()
    tasks = clone.path / "project/prayer_room_api/tasks.py"
    broken = '    raise RuntimeError("broken ping")\n    return {"release"'
    tasks.write_text(tasks.read_text().replace('    return {"release"', broken))
    clone.git("add", str(tasks.relative_to(clone.path)))
    migration = commit_model_change(
        clone, "mood = models.CharField(max_length=8, null=True)", "prayerrequest_mood", "a mood and a broken worker"
    )
    line = refused(target.fab("deploy", repo=clone.path))
    assert "rolled back to" in line and live in line and "broken ping" in line
    assert "the migrations it applied were unapplied" in line and migration in line
    assert migration not in applied(target) and "mood" not in columns(target)
    assert target.live_release() == live and post_request(target)[0] == 201
    assert http_get(target.front_url)[0] == 200
    clone.revert_head()


def test_a_failure_after_migrate_says_so_and_unapplies_what_it_applied(target, clone):
    live = target.live_release()
    command = clone.path / "project/prayer_room_api/management/commands/seed_schedules.py"
    broken = '    def handle(self, *args, check=False, **options):\n        raise CommandError("seeding is broken")\n'
    command.write_text(command.read_text().replace("    def handle(self, *args, check=False, **options):\n", broken))
    clone.git("add", str(command.relative_to(clone.path)))
    migration = commit_model_change(
        clone, "mood = models.CharField(max_length=8, null=True)", "prayerrequest_mood", "a mood and broken seeding"
    )
    line = refused(target.fab("deploy", repo=clone.path))
    assert "(seed_schedules)" in line and "seeding is broken" in line and "failed at the schema step" in line
    assert f"the migrations it applied were unapplied ({migration})" in line and f"{live} keeps serving" in line
    assert migration not in applied(target) and "mood" not in columns(target)
    assert target.live_release() == live and post_request(target)[0] == 201
    clone.revert_head()


def test_rollback_with_restore_puts_back_the_backup_the_deploy_took(target, clone):
    live = target.live_release()
    migration = commit_model_change(
        clone, 'feeling = models.CharField(max_length=8, default="calm")', "prayerrequest_feeling", "a feeling"
    )
    before = rows(target)
    new = ok(target.fab("deploy", "--maintenance", repo=clone.path))
    saved = re.search(r"(\S+-deploy-\S+\.dump): ", new).group(1)
    assert post_request(target, "written after the backup")[0] == 201
    line = refused(target.fab("rollback"))
    assert migration in line and f"--restore {saved}" in line
    out = ok(target.fab("rollback", "--restore", saved))
    assert "every write made since that backup is LOST" in out
    assert target.live_release() == live and rows(target) == before  # the request written since is gone
    assert "feeling" not in columns(target) and migration not in applied(target)
    assert post_request(target)[0] == 201
    clone.revert_head()
