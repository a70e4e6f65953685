"""Deploys that keep the data, over real SSH to a real supervisord, PostgreSQL and nginx: backups and restore,
migrations the live release cannot live with, rollbacks that know the schema, verification that writes work.

The tests share one target and run in file order: each starts from the release and schema the previous one left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
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

from deploy.state import DEPLOYED_MARK
from tests.deploy.target import REPO, Clone, DeployTarget, history_rows, http_get, unavailable
from tests.support.stack import Database

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

    def wait_for_more(self, answers: int, timeout: float = 60) -> None:
        """Until both loops have had `answers` more answers than when called."""
        until = {method: len(found) + answers for method, found in self.answers.items()}
        deadline = time.monotonic() + timeout
        while any(len(self.answers[method]) < n for method, n in until.items()):
            if time.monotonic() > deadline:
                got = {method: len(found) for method, found in self.answers.items()}
                raise TimeoutError(f"the traffic got {got} answers, not {until}, in {timeout} s")
            time.sleep(0.05)

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


def commit_model_change(
    clone: Clone, field_line: str, migration_name: str, message: str, *, then: str | None = None
) -> str:
    """Add `field_line` to PrayerRequest and commit it with the migration makemigrations writes for it
    (plus the operation `then` after its own, e.g. a RunSQL)."""
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
    if then:
        text = new[0].read_text()
        end = text.rindex("    ]")
        new[0].write_text(f"{text[:end]}        {then},\n{text[end:]}")
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
    kinds = {json.loads(p.read_text())["kind"]: p.name.removesuffix(".json") for p in backups.glob("*.json")}
    assert sorted(kinds) == ["manual", "restore"]  # the state it replaced was backed up first
    assert post_request(target)[0] == 201
    [row] = history_rows(ok(target.fab("history", "--lines", "1")))  # the restore, with the backup taken first
    assert (
        row[1:3] == ["restore", "ok"]
        and row[5] == f"{target.live_release()}; backup {kinds['restore']}; restored {name}"
    ), row


def test_a_download_is_private_and_never_replaces_a_file(target, tmp_path):
    mine, link, victim = tmp_path / "mine.dump", tmp_path / "link.dump", tmp_path / "victim"
    mine.write_text("the operator's own file\n")
    victim.write_text("a file the link points at\n")
    link.symlink_to(victim)
    for path in (mine, link):
        assert "a download never replaces a file" in refused(target.fab("backup", "--download", str(path)))
    assert mine.read_text() == "the operator's own file\n" and victim.read_text() == "a file the link points at\n"
    # Positive control: a new name gets the backup, readable by its owner only whatever the umask.
    fresh = tmp_path / "fresh.dump"
    old = os.umask(0o022)  # a common umask: files default to 0644
    try:
        ok(target.fab("backup", "--download", str(fresh)))
    finally:
        os.umask(old)
    assert fresh.stat().st_size > 0 and oct(fresh.stat().st_mode & 0o777) == "0o600"


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
        traffic.wait_for_more(3)  # answers after the command
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
        traffic.wait_for_more(3)  # answers after the command
    figures["compatible_deploy"] = {
        method: {str(status): answers.count(status) for status in set(answers)}
        for method, answers in traffic.answers.items()
    }
    assert "maintenance" not in out and migration in applied(target)
    assert traffic.failures == [], traffic.failures[:5]  # the old release writes through the new schema
    shown = ok(target.fab("history", "--lines", "10"))
    print(shown)
    row = history_rows(shown)[-1]  # WHAT: the migration applied, the backup taken
    live = target.live_release()
    backup = re.search(r"\S+-deploy-" + re.escape(live) + r"\.dump", out)[0]
    assert (
        row[1:3] == ["deploy", "ok"]
        and row[5] == f"{live}; commit {live[-12:]}; migrations {migration}; backup {backup}"
    ), row
    assert len(traffic.answers["POST"]) > 20 and len(traffic.answers["GET"]) > 20


def verified_before(target: DeployTarget, release: str) -> str:
    """The newest verified release older than `release`: where a plain rollback goes."""
    marked = [r for r in target.releases() if (target.srv / "releases" / r / DEPLOYED_MARK).exists() and r < release]
    assert marked, target.releases()
    return marked[-1]


def traffic_figures(traffic: Traffic, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 1),
        **{method: {str(s): answers.count(s) for s in set(answers)} for method, answers in traffic.answers.items()},
        "failures": len(traffic.failures),
    }


def test_rollback_keep_schema_leaves_a_compatible_migration_and_the_old_release_serves(target, clone):
    live = target.live_release()
    [migration] = [m for m in applied(target) if m.endswith("_prayerrequest_language_db_default")]
    line = refused(target.fab("rollback"))
    assert migration in line and "--keep-schema" in line and target.live_release() == live

    back = verified_before(target, live)
    with Traffic(target) as traffic:
        started = time.monotonic()
        out = ok(target.fab("rollback", "--keep-schema"))
        seconds = time.monotonic() - started
        traffic.wait_for_more(3)  # answers after the command
    figures["keep_schema_rollback"] = traffic_figures(traffic, seconds)
    assert target.live_release() == back
    assert f"--keep-schema: {back} runs against {migration}, which it lacks" in out
    assert f"{live} -> {back} (the schema is left as it is)" in out
    assert "language" in columns(target) and migration in applied(target)  # the database keeps it
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.count("GET", 200) > 20 and traffic.count("POST", 201) > 20
    status, body = post_request(target, "written by the release that lacks the column")
    assert status == 201, body
    assert target.database.query(f"SELECT language FROM {TABLE} ORDER BY id DESC LIMIT 1") == [("en",)]
    assert http_get(target.front_url)[0] == 200


def break_file(clone: Clone, relative: str, old: str, new: str) -> None:
    """Replace `old` (which must be there) with `new` in a file of the clone and stage it."""
    path = clone.path / relative
    text = path.read_text()
    assert old in text, f"{old!r} is not in {relative}"
    path.write_text(text.replace(old, new, 1))
    clone.git("add", relative)


PING = '    return {"release"'
BROKEN_PING = ("project/prayer_room_api/tasks.py", PING, f'    raise RuntimeError("broken ping")\n{PING}')


def deploy_mood_with_a_break(target, clone, relative: str, old: str, new: str, message: str) -> str:
    """Commit a file broken (`old` -> `new`) with a nullable `mood` column and deploy it: it fails, the migration is
    unapplied, the live release is unchanged and serving. Returns the error line."""
    live = target.live_release()
    break_file(clone, relative, old, new)
    migration = commit_model_change(
        clone, "mood = models.CharField(max_length=8, null=True)", "prayerrequest_mood", message
    )
    line = refused(target.fab("deploy", repo=clone.path))
    assert f"the migrations it applied were unapplied ({migration})" in line, line
    assert migration not in applied(target) and "mood" not in columns(target)
    assert target.live_release() == live and post_request(target)[0] == 201
    assert http_get(target.front_url)[0] == 200
    clone.revert_head()
    return line


def test_a_failed_verification_unapplies_the_migrations_the_deploy_applied(target, clone):
    live = target.live_release()
    line = deploy_mood_with_a_break(target, clone, *BROKEN_PING, "a mood and a broken worker")
    assert "rolled back to" in line and live in line and "broken ping" in line


def test_a_failure_after_migrate_says_so_and_unapplies_what_it_applied(target, clone):
    live = target.live_release()
    handle = "    def handle(self, *args, check=False, **options):\n"
    line = deploy_mood_with_a_break(
        target, clone, "project/prayer_room_api/management/commands/seed_schedules.py", handle,
        handle + '        raise CommandError("seeding is broken")\n', "a mood and broken seeding",
    )  # fmt: skip
    assert "(seed_schedules)" in line and "seeding is broken" in line and "failed at the schema step" in line
    assert f"{live} keeps serving" in line


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


def test_an_irreversible_migration_stays_after_a_failed_verification_and_the_message_names_the_backup(target, clone):
    live = target.live_release()
    break_file(clone, *BROKEN_PING)
    migration = commit_model_change(
        clone, "mood = models.CharField(max_length=8, null=True)", "prayerrequest_mood_filled",
        "a mood filled in by SQL, and a broken worker",
        then=f"migrations.RunSQL(\"UPDATE {TABLE} SET mood = 'calm'\")",  # no reverse_sql: irreversible
    )  # fmt: skip
    sha12 = clone.git("rev-parse", "HEAD").strip()[:12]
    with Traffic(target) as traffic:
        started = time.monotonic()
        result = target.fab("deploy", repo=clone.path)
        seconds = time.monotonic() - started
        traffic.wait_for_more(3)  # answers after the command
    figures["irreversible_failed_deploy"] = traffic_figures(traffic, seconds)
    line = refused(result)
    figures["irreversible_failed_deploy_message"] = line
    assert "rolled back to" in line and live in line and "broken ping" in line
    assert f"the database KEEPS the migrations {migration}" in line and "cannot be reversed" in line
    saved = re.search(r"`fab restore (\S+) --yes`", line)
    assert saved and re.fullmatch(rf"\d{{14}}-deploy-\d{{14}}-{sha12}\.dump", saved[1]), line
    assert (target.workdir / "backups" / saved[1]).exists()
    assert migration in applied(target) and "mood" in columns(target)
    assert target.live_release() == live and post_request(target)[0] == 201
    assert http_get(target.front_url)[0] == 200
    assert traffic.failures == [], traffic.failures[:5]

    ok(target.fab("restore", saved[1], "--yes"))  # what the message says to run
    assert migration not in applied(target) and "mood" not in columns(target)
    assert target.live_release() == live and post_request(target)[0] == 201
    clone.revert_head()


def backups_by_kind(target: DeployTarget) -> dict[str, list[str]]:
    """The backups on the server (their records' names), oldest first, by kind."""
    found: dict[str, list[str]] = {}
    for path in sorted((target.workdir / "backups").glob("*.dump.json")):
        record = json.loads(path.read_text())
        found.setdefault(record["kind"], []).append(record["name"])
    return {kind: sorted(names) for kind, names in found.items()}


def test_backup_keep_counts_each_kind_on_its_own(target):
    config = target.config_file_with(backup_keep=1)
    before = backups_by_kind(target)
    others = {kind: names for kind, names in before.items() if kind != "manual"}
    assert sum(map(len, others.values())) >= 1, before  # a count shared by the kinds would prune them
    taken = []
    for _ in range(2):
        while taken and time.strftime("%Y%m%d%H%M%S", time.gmtime()) <= taken[-1].split("-")[0]:
            time.sleep(0.05)  # a backup's name starts with its second: the next one's must be another
        taken.append(ok(target.fab("backup", config=config)).split(":")[0].strip())
    after = backups_by_kind(target)
    assert after["manual"] == taken[1:], (taken, after)  # the newest manual one
    assert {kind: names for kind, names in after.items() if kind != "manual"} == others
    for name in [*before.get("manual", []), taken[0]]:
        assert not (target.workdir / "backups" / name).exists()


def damage(target: DeployTarget, name: str, *, recorded: bool) -> None:
    """Cut backup `name` to 60 % of its size (a dump whose disk filled up), with its record's sha256 and size
    updated to match (`recorded`), or not (a file damaged since it was taken)."""
    dump = target.workdir / "backups" / name
    data = dump.read_bytes()[: dump.stat().st_size * 6 // 10]
    dump.write_bytes(data)
    if recorded:
        record_path = dump.with_name(f"{name}.json")
        record = json.loads(record_path.read_text())
        record.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        record_path.write_text(json.dumps(record))


def database_state(target: DeployTarget) -> tuple:
    return rows(target), sorted(columns(target)), sorted(applied(target))


def restore_refused(target: DeployTarget, name: str) -> str:
    """`fab restore NAME --yes` refused with the database, the live release and the backups' records unchanged;
    the programs are started again (`fab restart`) if the refusal left them stopped. Returns the error line."""
    before = database_state(target), target.live_release()
    line = refused(target.fab("restore", name, "--yes"))
    assert (database_state(target), target.live_release()) == before
    if set(target.states().values()) != {"RUNNING"}:
        ok(target.fab("restart"))
    assert http_get(target.front_url)[0] == 200
    return line


def test_a_damaged_backup_is_refused_and_the_database_is_unchanged(target):
    name = ok(target.fab("backup")).split(":")[0].strip()
    assert post_request(target, "written after the backup")[0] == 201  # so that a restore would show
    damage(target, name, recorded=False)
    line = restore_refused(target, name)
    assert f"{name} does not match its recorded sha256: the file is damaged; nothing restored" in line, line


def test_a_failed_restore_leaves_the_database_unchanged(target):
    name = ok(target.fab("backup")).split(":")[0].strip()
    assert post_request(target, "written after the backup")[0] == 201
    damage(target, name, recorded=True)  # its checksum matches: the restore itself fails
    line = restore_refused(target, name)
    assert f"restoring {name} failed, the database is unchanged (one transaction)" in line, line


def test_a_refused_restore_leaves_the_programs_running(target):
    name = ok(target.fab("backup")).split(":")[0].strip()
    damage(target, name, recorded=False)
    refused(target.fab("restore", name, "--yes"))
    try:
        assert set(target.states().values()) == {"RUNNING"}, target.states()
        assert http_get(target.front_url)[0] == 200
    finally:
        if set(target.states().values()) != {"RUNNING"}:
            ok(target.fab("restart"))


def test_a_restore_stopped_between_its_transactions_is_settled_by_the_next_one(target, clone):
    """A restore killed after it set the database aside (schema public_before_restore_TIME, an empty public in its
    place) and before pg_restore committed: `fab status` says so, `fab deploy` refuses in one line and changes
    nothing; the next `fab restore` puts it back before the dump it takes first, says so, and restores."""
    name = ok(target.fab("backup")).split(":")[0].strip()
    before = rows(target)
    ((owner,),) = target.database.query(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
    )
    target.database.query(  # what the helper's first transaction commits, as the database's owner
        f'ALTER SCHEMA public RENAME TO public_before_restore_1000; CREATE SCHEMA public AUTHORIZATION "{owner}"'
    )
    schemas = "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'public%%' ORDER BY 1"
    left = target.database.query(schemas), target.live_release(), target.releases()
    assert left[0] == [("public",), ("public_before_restore_1000",)]
    started = time.monotonic()
    shown = ok(target.fab("status"))
    assert "ALERT restore: a restore was interrupted at 1970-01-01 00:16:40 UTC before it committed" in shown, shown
    figures["interrupted_restore_status_seconds"] = round(time.monotonic() - started, 2)
    started = time.monotonic()
    line = refused(target.fab("deploy", repo=clone.path))
    figures["interrupted_restore_deploy_refusal_seconds"] = round(time.monotonic() - started, 2)
    assert line.startswith("error: deploy refused, nothing changed: a restore was interrupted at ") and (
        "run `fab restore NAME --yes` again: it first puts public_before_restore_1000 back as public" in line
    ), line
    assert (target.database.query(schemas), target.live_release(), target.releases()) == left
    out = ok(target.fab("restore", name, "--yes"))
    assert (
        "NOTE: a restore interrupted at 1970-01-01 00:16:40 UTC had left the database in schema "
        "public_before_restore_1000: it is public again, as it was before that restore" in out
    ), out
    assert rows(target) == before
    assert target.database.query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'public%%'") == [("public",)]
    records = [json.loads(p.read_text()) for p in (target.workdir / "backups").glob("*.json")]
    taken_first = max((r for r in records if r["kind"] == "restore"), key=lambda r: r["created"])
    ours = next(r for r in records if r["name"] == name)
    assert taken_first["size"] >= ours["size"] * 0.9, (taken_first, ours)  # the database, not an empty schema
    assert post_request(target)[0] == 201


def release_migrations(target: DeployTarget, release: str) -> set[str]:
    """The project app's migrations in a release's code on the server."""
    found = (target.srv / "releases" / release / MIGRATIONS).glob("0*.py")
    return {f"prayer_room_api.{path.stem}" for path in found}


def app_applied(target: DeployTarget) -> set[str]:
    return {name for name in applied(target) if name.startswith("prayer_room_api.")}


@pytest.fixture(scope="module")
def newer_release(target, clone):
    """A release with a nullable column and a CHECK constraint deployed over the live one; before it, a manual backup
    whose data breaks the constraint (a row prayed for 123456 times, set back before the deploy). Returns (the
    release the data belongs to, the newer release, its migration, the deploy's backup, the breaking backup, the
    data's migrations)."""
    older, data_migrations = target.live_release(), app_applied(target)
    (request_id,) = target.database.query(f"SELECT max(id) FROM {TABLE}")[0]
    target.database.query(f"UPDATE {TABLE} SET prayer_count = 123456 WHERE id = %s", (request_id,))
    breaking = ok(target.fab("backup")).split(":")[0].strip()
    target.database.query(f"UPDATE {TABLE} SET prayer_count = 0 WHERE id = %s", (request_id,))
    constraint = (
        "migrations.AddConstraint(model_name='prayerrequest', constraint=models.CheckConstraint("
        "condition=models.Q(prayer_count__lt=100000), name='prayer_count_sane'))"
    )
    migration = commit_model_change(
        clone, "mood = models.CharField(max_length=8, null=True)", "prayerrequest_mood_sane", "a mood, sane counts",
        then=constraint,
    )  # fmt: skip
    out = ok(target.fab("deploy", repo=clone.path))
    saved = re.search(r"(\S+-deploy-\S+\.dump): ", out).group(1)
    newer = target.live_release()
    assert newer != older and migration in applied(target)
    return older, newer, migration, saved, breaking, data_migrations


def test_a_restore_of_the_backup_before_a_deploy_s_migrations_migrates_the_data_forward(target, newer_release):
    _, newer, migration, saved, _, _ = newer_release
    assert post_request(target, "written after the deploy's backup")[0] == 201
    started = time.monotonic()
    out = ok(target.fab("restore", saved, "--yes"))
    figures["restore_forward_fab_seconds"] = round(time.monotonic() - started, 2)
    assert f"chosen: {newer} (live) adds 1 migration(s) to the restored data" in out, out
    assert f"applied {migration}" in out and "verify: migrate --check" in out
    assert target.live_release() == newer and set(target.states().values()) == {"RUNNING"}
    assert app_applied(target) == release_migrations(target, newer)  # the schema is the running release's
    assert "mood" in columns(target)
    assert not target.database.query(f"SELECT 1 FROM {TABLE} WHERE content = 'written after the deploy''s backup'")
    status, body = post_request(target, "written after the restore")
    assert status == 201, body
    assert http_get(target.front_url)[0] == 200


def test_a_restore_the_live_release_cannot_migrate_forward_switches_to_the_data_s_release(target, newer_release):
    older, newer, migration, _, breaking, data_migrations = newer_release
    started = time.monotonic()
    out = ok(target.fab("restore", breaking, "--yes"))
    figures["restore_switch_fab_seconds"] = round(time.monotonic() - started, 2)
    assert f"chosen: {newer} (live) adds 1 migration(s)" in out  # first the facts said it could ...
    assert "migrating the data forward with" in out and "failed and changed nothing" in out  # ... the data said no
    assert "prayer_count_sane" in out and f"the data belongs to {older}" in out, out
    assert target.live_release() == older and set(target.states().values()) == {"RUNNING"}
    assert app_applied(target) == data_migrations and migration not in applied(target)
    assert release_migrations(target, older) <= data_migrations  # (more only after a rollback --keep-schema)
    assert "mood" not in columns(target)
    assert target.database.query(f"SELECT count(*) FROM {TABLE} WHERE prayer_count = 123456") == [(1,)]
    status, body = post_request(target, "written by the data's own release")
    assert status == 201, body
    assert http_get(target.front_url)[0] == 200
    assert not (target.srv / "releases" / newer / DEPLOYED_MARK).exists()  # a plain rollback skips it


def pgserver_bin() -> Path:
    """The pgserver wheel's PostgreSQL 16.2 tools: a pg_dump from before the August 2025 fixes (CVE-2025-8715), which
    writes an object name's newline into the dump's `-- load via partition root` comment as it is."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")  # not imported: its import sets up lock files
    assert spec and spec.submodule_search_locations, "the pgserver wheel (a test dependency) is not installed"
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def old_way_restore(dump: Path, database_url: str, pg_bin: Path) -> subprocess.CompletedProcess:
    """What `root_helper.py restore` did before: pg_restore's SQL text piped through psql, as root."""
    pipeline = (
        f"{shlex.quote(str(pg_bin / 'pg_restore'))} --no-owner --no-privileges --file=- {shlex.quote(str(dump))} | "
        f"{shlex.quote(str(pg_bin / 'psql'))} -X -q --single-transaction -v ON_ERROR_STOP=1 {shlex.quote(database_url)}"
    )
    return subprocess.run(["sh", "-c", pipeline], capture_output=True, text=True, timeout=120)


def test_a_dump_whose_table_names_carry_a_psql_meta_command_restores_inert(target, tmp_path):
    """The app role names a table (hash-partitioned on an enum, so that pg_dump loads its data through the root and
    writes its name in a comment) with a newline and `\\! touch MARKER`. Restored now: no effect. Positive control:
    the same dump the old way (pg_restore | psql, as root) runs the command."""
    drop = tempfile.mkdtemp(prefix="prayer-room-pwned-")
    os.chmod(drop, 0o1777)  # whoever would run the command could write here
    marker = Path(drop) / "pwned"
    evil = f"feelings\n\\! touch {marker}\n"
    quoted = '"' + evil.replace('"', '""') + '"'
    create = [
        "CREATE TYPE feeling AS ENUM ('calm', 'glad')",
        f"CREATE TABLE {quoted} (id int, f feeling) PARTITION BY HASH (f)",
        f"CREATE TABLE feelings_0 PARTITION OF {quoted} FOR VALUES WITH (MODULUS 2, REMAINDER 0)",
        f"CREATE TABLE feelings_1 PARTITION OF {quoted} FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
        f"INSERT INTO {quoted} VALUES (1, 'calm'), (2, 'glad')",
    ]
    cleanup = [f"DROP TABLE IF EXISTS {quoted}", "DROP TYPE IF EXISTS feeling"]
    old_tools = target.config_file_with(postgres_bin=str(pgserver_bin()))
    scratch = Database().create()
    try:
        for statement in create:
            target.database.query(statement)
        inert = ok(target.fab("backup")).split(":")[0].strip()  # the server's own pg_dump
        hostile = ok(target.fab("backup", config=old_tools)).split(":")[0].strip()  # a pg_dump without the fix
        for statement in cleanup:
            target.database.query(statement)
        before = database_state(target), target.live_release()

        started = time.monotonic()
        out = ok(target.fab("restore", inert, "--yes"))
        figures["restore_hostile_names_fab_seconds"] = round(time.monotonic() - started, 2)
        assert "verify: migrate --check" in out
        found = "SELECT relname FROM pg_class WHERE relname LIKE %s ORDER BY 1"
        restored = target.database.query(found, ("feelings%",))
        assert set(restored) == {("feelings_0",), ("feelings_1",), (evil,)}  # the name, newline and all, is data
        assert not marker.exists()
        for statement in cleanup:
            target.database.query(statement)

        line = refused(target.fab("restore", hostile, "--yes", config=old_tools))
        figures["restore_hostile_dump_message"] = line
        assert f"restoring {hostile} failed, the database is unchanged (one transaction)" in line
        assert 'syntax error at or near "\\"' in line  # the server was sent the command as SQL, and refused it
        assert not marker.exists()
        assert (database_state(target), target.live_release()) == before
        assert set(target.states().values()) == {"RUNNING"} and post_request(target)[0] == 201

        # Positive control: the same dump through psql, the way the restore went before, runs the command.
        control = old_way_restore(target.workdir / "backups" / hostile, scratch.url, pgserver_bin())
        assert marker.exists(), f"the old way did not run the command: {control.stderr[-500:]}"
        assert marker.stat().st_uid == 0  # as root
    finally:
        scratch.drop()
        for statement in cleanup:
            target.database.query(statement)
        shutil.rmtree(drop, ignore_errors=True)
