"""`fab deploy`, redeploy, rollback and refusals over real SSH to a real supervisord, PostgreSQL, Redis and nginx.

The tests share one target and run in file order: each starts from the release the previous one left live.
"""

from __future__ import annotations

import getpass
import io
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from fabric import Connection

from deploy.app import REDIS_PREFIX_LINE, REDIS_PREFIX_SETTINGS
from deploy.config import load_config
from deploy.errors import DeployError
from deploy.lock import DeployLock
from deploy.maintenance import window
from deploy.progress import Progress
from deploy.release import uses_redis_prefix
from deploy.site import LockKeeper
from deploy.ssh import connect
from tests.deploy.target import (
    APP_USER,
    CLONE_AUTHOR,
    NO_SUDO_USER,
    OPERATOR,
    SUDO_USER,
    Clone,
    DeployTarget,
    ensure_sudoer,
    ensure_user,
    history_rows,
    http_get,
    unavailable,
)
from tests.support.admin_http import sign_in_to_admin
from tests.support.pty_session import PtySession
from tests.support.stack import celery_app, redis_url
from tests.support.webhook import Receiver

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

MIGRATIONS = Path("project/prayer_room_api/migrations")
STATIC_CSS = "project/prayer_room_api/static/e2e.css"
STATIC_ATTACKER = Path(__file__).with_name("static_attacker.py")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    # NOTE: not under pytest's tmp dirs: they are 0700 and the app user must reach the server root.
    workdir = Path(tempfile.mkdtemp(prefix="prayer-room-deploy-e2e-"))
    target = DeployTarget(workdir)
    try:
        yield target.start()
    finally:
        target.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def clone(target):
    clone = Clone(target.workdir / "repo")
    clone.commit_file(STATIC_CSS, static_css("first"), "a stylesheet of the app's own")
    return clone


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def failed(result) -> str:
    """The one error line of a refused command (no traceback)."""
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def output_until(process, marker: str) -> str:
    """The background fab's output up to and including the line that contains `marker`."""
    seen = ""
    while marker not in seen:
        line = process.stdout.readline()
        assert line, f"the deploy ended early:\n{seen}"
        seen += line
    return seen


def live_release_over_http(target: DeployTarget) -> str:
    status, body = http_get(target.front_url)
    assert status == 200, body
    return json.loads(body)["release"]


def run_ping(target: DeployTarget) -> dict:
    broker = f"{redis_url()}/{target.redis_db}"
    app = celery_app(broker)
    try:
        return app.send_task("prayer_room_api.tasks.ping").get(timeout=60)
    finally:
        app.close()


def test_first_deploy_runs_web_worker_and_beat_behind_the_front_server(target, clone):
    """Also proves the committed requirements.lock installs on Debian 12's Python (the venv is `pip check`ed)."""
    out = ok(target.fab("deploy", repo=clone.path))
    release = target.live_release()
    assert release and release.endswith(clone.git("rev-parse", "HEAD")[:12])
    assert re.search(r"is live in [\d.]+ s", out) and "ok  prepare" in out
    assert "UNSAFE" not in out and "no live release to check them against" in out, out  # nothing runs the old schema
    assert "no backup: no live release yet" in out and "back up the database" not in out, out
    # check --deploy's warnings are shown, not hidden behind "ok" (the target has no TLS: SECURE_SSL_REDIRECT=false).
    assert "ok  check --deploy" in out and "WARNING: ?: (security.W008)" in out, out
    live = (target.srv / "releases" / release).stat()
    assert (live.st_uid, live.st_mode & 0o777) == (0, 0o755)  # root's, read-only to the app user
    venv = (target.srv / "current" / ".venv").resolve()
    assert all(path.lstat().st_uid == 0 for path in venv.rglob("*"))
    states = target.states()
    assert states == {f"prayer-room:{name}": "RUNNING" for name in ("web-1", "web-2", "worker", "beat")}, states
    assert live_release_over_http(target) == release
    assert run_ping(target)["release"] == release
    beat_log = (target.srv / "log" / "beat.log").read_text()
    assert "prayer_room_api.beat.LeaderDatabaseScheduler" in beat_log and "took the leader lock" in beat_log
    assert "one beat leads" in out and "leader: prayer-room beat " in out
    assert target.database.query("SELECT count(*) FROM django_celery_beat_periodictask")[0][0] > 0
    for pid in target.supervisorctl("pid", "all").stdout.split():
        assert Path(f"/proc/{pid}").stat().st_uid == pwd.getpwnam(APP_USER).pw_uid
    assert (target.srv / "current" / "REVISION").read_text().strip() == release
    assert oct((target.etc / "programs.conf").stat().st_mode & 0o777) == "0o600"
    # The env file's values reach the programs through the effective env file only (root's, the app group reads it).
    assert "SECRET_KEY" not in (target.etc / "programs.conf").read_text()
    effective = (target.srv / "shared" / "env.effective").stat()
    assert (effective.st_uid, effective.st_gid, effective.st_mode & 0o777) == (0, pwd.getpwnam(APP_USER).pw_gid, 0o640)


def test_root_runs_manage_in_the_live_release_with_the_programs_environment(target):
    """prayer-room-manage: the settings the web programs run with, as the app user; the command's exit code."""
    manage = str(target.workdir / "sbin" / "prayer-room-manage")
    show = "from django.conf import settings as s; import os; print(os.getuid(), s.RELEASE, s.STATIC_ROOT, s.DEBUG)"
    result = subprocess.run([manage, "shell", "-c", show], capture_output=True, text=True, timeout=120, env={})
    assert result.returncode == 0, result.stdout + result.stderr
    release = target.live_release()
    static = target.srv / "releases" / release / "static"
    shown = result.stdout.splitlines()[-1].split()  # after Django's own line on the shell's automatic imports
    assert shown == [str(pwd.getpwnam(APP_USER).pw_uid), release, str(static), "False"], result.stdout
    failing = subprocess.run([manage, "migrate", "no_such_app"], capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1 and "no_such_app" in failing.stderr, failing.stdout + failing.stderr


def test_fab_manage_passes_stdin_stdout_and_the_exit_code_through(target):
    """Without a terminal, `fab manage` reads stdin and writes stdout; its exit code is manage.py's."""
    env = {**os.environ, "HOME": str(target.home)}
    piped = subprocess.run(
        target.fab_argv("manage", "shell"), env=env, capture_output=True, text=True, timeout=300,
        input="from django.contrib.auth.models import User; print(User.objects.count(), 6 * 7)\n",
    )  # fmt: skip
    assert piped.returncode == 0 and re.search(r"\b\d+ 42\b", piped.stdout), piped.stdout + piped.stderr
    failing = target.fab("manage", "migrate no_such_app")
    assert failing.returncode == 1 and "no_such_app" in failing.stderr + failing.stdout
    # 45 KB of characters of 2, 3 and 4 bytes on each stream: SSH reads of 1000 bytes cut them.
    text = "é€🙏" * 5000
    wide = target.fab("manage", "shell -c \"import sys; t = 'é€🙏' * 5000; print(t); print(t[::-1], file=sys.stderr)\"")
    assert wide.returncode == 0, wide.stderr[-2000:]
    assert text in wide.stdout.splitlines() and text[::-1] in wide.stderr.splitlines()
    assert "\ufffd" not in wide.stdout + wide.stderr


def terminal_fab(target: DeployTarget, task: str, *args: str) -> PtySession:
    """`fab TASK ARGS` on a pseudo-terminal of its own, as an operator runs it."""
    env = {**os.environ, "HOME": str(target.home), "TERM": "xterm"}
    return PtySession(target.fab_argv(task, *args), env=env)


def test_createsuperuser_and_shell_on_a_terminal_then_the_account_signs_into_the_admin(target):
    """`fab manage createsuperuser` prompts on the operator's terminal (a name typed with a non-ASCII letter, as
    people type theirs), `fab shell` is interactive and Ctrl-C reaches the command; the account signs in through
    the provisioned nginx site."""
    started = time.monotonic()
    username, password = "josé-admin", "a long pass phrase 7"
    prompts = terminal_fab(target, "manage", "createsuperuser")
    prompts.expect("Username (leave blank to use")
    prompts.line(username)
    prompts.expect("Email address:")
    prompts.line("jose@example.com")
    prompts.expect("Password:")
    prompts.line(password)
    prompts.expect("Password (again):")
    prompts.line(password)
    prompts.expect("Superuser created successfully.")
    assert prompts.wait() == 0
    assert password.encode() not in prompts.seen  # the password prompt does not echo
    assert b"\r\r\n" not in prompts.seen  # the remote terminal's lines, not translated twice

    shell = terminal_fab(target, "shell")
    shell.expect(">>> ")
    shell.line("from django.contrib.auth.models import User; import os")
    shell.expect(">>> ")
    shell.line(f"print(os.isatty(0), User.objects.get(username={username!r}).is_superuser)")
    shell.expect("True True")
    shell.line("while True: pass")
    shell.expect("... ")
    shell.line("")
    shell.send("\x03")  # Ctrl-C interrupts the loop in the shell, not fab
    shell.expect("KeyboardInterrupt")
    shell.expect(">>> ")
    shell.send("\x04")  # Ctrl-D ends the shell
    assert shell.wait() == 0, shell.seen[-500:]

    status, page = sign_in_to_admin(f"http://127.0.0.1:{target.nginx_port}", username, password)
    assert status == 200 and "Site administration" in page and "Periodic tasks" in page, page[:2000]
    assert "josé-admin".upper() in page.upper()  # the admin greets the account
    refused = sign_in_to_admin(f"http://127.0.0.1:{target.nginx_port}", username, "not the password")
    assert "Site administration" not in refused[1]  # positive control: a wrong password does not get in
    print(f"createsuperuser and shell on a terminal, admin sign-in: {time.monotonic() - started:.1f} s")


def seen_by_manage(target: DeployTarget, key: str) -> str:
    """`key` as manage.py sees it through root's prayer-room-manage (the programs' environment)."""
    manage = str(target.workdir / "sbin" / "prayer-room-manage")
    code = f"import os; print('value:', os.environ.get({key!r}))"
    result = subprocess.run([manage, "shell", "-c", code], capture_output=True, text=True, timeout=120, env={})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split("value: ")[-1].strip()


def test_fab_env_lists_each_variable_and_where_it_comes_from_without_a_secret(target):
    env_text = (target.srv / "shared" / "env").read_text()
    secret = re.search(r"^SECRET_KEY=(.*)$", env_text, re.M)[1]
    database_password = urllib.parse.urlsplit(re.search(r"^DATABASE_URL=(.*)$", env_text, re.M)[1]).password
    out = ok(target.fab("env"))
    print(out)
    assert secret not in out and (not database_password or database_password not in out)
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert re.fullmatch(r"SECRET_KEY +\*{8} +env file", rows["SECRET_KEY"]), rows["SECRET_KEY"]
    assert re.fullmatch(r"WEB_WORKERS +2 +derived from deploy.toml web_workers", rows["WEB_WORKERS"])
    assert re.fullmatch(r"THROTTLE_SUBMIT +1000000/hour +env file", rows["THROTTLE_SUBMIT"])
    assert rows["DJANGO_SETTINGS_MODULE"].split()[-3:] == ["default", "(deploy.toml", "settings_module)"]
    assert "not applied yet" not in out


def test_an_env_change_restarts_like_a_deploy_and_no_get_or_post_fails(target):
    """--set on the env file: the previous kept (root:<app group> 0640), web one at a time under a GET+POST loop
    through nginx, every program restarted, the value where the programs read it."""
    shared = target.srv / "shared"
    before, pids = (shared / "env").read_bytes(), program_pids(target)
    with target.request_loop() as loop:
        loop.wait_for_more(5)
        started, before_counts = time.monotonic(), (loop.ok, loop.posted, len(loop.failures))
        result = target.fab("env", "--set", "PRAYER_ROOM_E2E_FLAG=on", "--set", "PRAYER_ROOM_E2E_NOTE=a b=c")
        took, during = time.monotonic() - started, (loop.ok, loop.posted, len(loop.failures))
        loop.wait_for_more(5)
    gets, posts, failures = (now - then for now, then in zip(during, before_counts, strict=True))
    figures = {"fab env --set (2 keys) s": round(took, 1), "GETs answered during it": gets,
               "POSTs answered during it": posts, "requests failed during it": failures,
               "requests failed before, during and after": len(loop.failures)}  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "env-change-e2e.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"env change applied in {took:.1f} s; {gets} GETs and {posts} POSTs answered, {failures} failed during it")
    out = ok(result)
    assert loop.failures == [], loop.failures[:5]
    assert loop.ok > 10 and loop.posted > 20
    assert out.index("restart web-1") < out.index("restart web-2") < out.index("warm shutdown")
    assert "a worker of this release ran the ping task" in out and "one beat leads" in out
    previous = (shared / "env.previous").stat()
    assert (shared / "env.previous").read_bytes() == before
    assert (previous.st_uid, previous.st_gid, previous.st_mode & 0o777) == (0, pwd.getpwnam(APP_USER).pw_gid, 0o640)
    env = (shared / "env").read_text()
    assert env.startswith(before.decode()) and env.endswith("PRAYER_ROOM_E2E_FLAG=on\nPRAYER_ROOM_E2E_NOTE=a b=c\n")
    assert "PRAYER_ROOM_E2E_FLAG='on'" in (shared / "env.effective").read_text()
    now = program_pids(target)
    assert set(now) == set(pids) and all(now[name] != pids[name] for name in pids), (pids, now)
    assert seen_by_manage(target, "PRAYER_ROOM_E2E_NOTE") == "a b=c"
    assert re.search(r"PRAYER_ROOM_E2E_FLAG +on +env file", ok(target.fab("env")))


def test_refused_env_changes_leave_the_env_file_as_it_was(target):
    """A derived value names the deploy.toml setting; a malformed pair or key gets the expected form; nothing changes
    and nothing restarts."""
    env_file = target.srv / "shared" / "env"
    before, pids = env_file.read_bytes(), program_pids(target)
    derived = failed(target.fab("env", "--set", "WEB_WORKERS=8"))
    assert "deploy.toml's `web_workers`" in derived, derived
    assert "STATIC_ROOT is the kit's own" in failed(target.fab("env", "--unset", "STATIC_ROOT"))
    assert "expected KEY=VALUE" in failed(target.fab("env", "--set", "BAD-KEY=1"))
    assert "deploy.toml's `trusted_proxies`" in failed(target.fab("env", "--set", "NUM_PROXIES=2"))
    # One bad pair or key among good ones: none is applied (the other malformed forms: tests/deploy/test_env.py).
    assert "expected KEY=VALUE" in failed(target.fab("env", "--set", "PRAYER_ROOM_E2E_FLAG=off", "--set", "X"))
    assert "expected KEY" in failed(target.fab("env", "--set", "PRAYER_ROOM_E2E_FLAG=off", "--unset", "A=B"))
    assert env_file.read_bytes() == before and program_pids(target) == pids
    assert not (target.srv / "shared" / "env.new").exists()
    assert "deploy lock" not in ok(target.fab("status"))


def test_an_env_change_that_breaks_the_web_puts_the_previous_env_file_back(target):
    """RELEASE names another release: web-1's health check fails before web-2 restarts; the env file comes back as
    it was and the programs run with it."""
    env_file = target.srv / "shared" / "env"
    before, pids = env_file.read_bytes(), program_pids(target)
    quick = target.config_file_with(health_timeout=8)
    result = target.fab("env", "--set", "RELEASE=not-this-one", "--unset", "PRAYER_ROOM_E2E_NOTE", config=quick)
    line = failed(result)
    assert "env change failed on 127.0.0.1" in line and "the previous env file is back" in line, line
    assert env_file.read_bytes() == before
    assert "RELEASE=" not in (target.srv / "shared" / "env.effective").read_text()
    assert set(program_pids(target)) == set(pids)  # every program RUNNING, with the previous environment
    assert live_release_over_http(target) == target.live_release()


def static_css(release: str) -> str:
    return f"/* {release} */\nbody {{ margin: 0; }}\n"


def hashed_name(target: DeployTarget, release: str, name: str) -> str:
    manifest = json.loads((target.srv / "releases" / release / "static" / "staticfiles.json").read_text())
    return manifest["paths"][name]


def test_code_change_redeploy_fails_no_get_or_post_through_the_provisioned_site(target, clone):
    """The front server is the site `fab provision` renders; the loop POSTs (submit, prayed) beside its GETs."""
    before = target.live_release()
    clone.commit_file(STATIC_CSS, static_css("second"), "a code-only change, and a stylesheet changed")
    with target.request_loop() as loop:
        out = ok(target.fab("deploy", repo=clone.path))
        loop.wait_for_more(3)  # requests after the deploy: they meet the new release
    after = target.live_release()
    assert after != before and after.endswith(clone.git("rev-parse", "HEAD")[:12])
    assert "reused (requirements.lock unchanged)" in out
    assert "restart web-1" in out and "restart web-2" in out  # rolling, not a group restart
    assert loop.failures == [] and loop.ok > 20 and loop.posted > 40, loop.failures[:5]
    assert after in loop.releases
    assert run_ping(target)["release"] == after


def test_each_release_serves_its_own_hashed_static_files_and_the_previous_ones(target):
    current = target.live_release()
    previous = os.readlink(target.srv / "previous").rstrip("/").rsplit("/", 1)[-1]
    new, old = hashed_name(target, current, "e2e.css"), hashed_name(target, previous, "e2e.css")
    assert new != old and re.fullmatch(r"e2e\.[0-9a-f]{12}\.css", new), (new, old)
    base = f"http://127.0.0.1:{target.nginx_port}/static/"
    for name, release in ((new, "second"), (old, "first")):  # the old name: for web programs not yet restarted
        response = urllib.request.urlopen(base + name, timeout=5)
        assert response.read().decode() == static_css(release)
        assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
    plain = urllib.request.urlopen(base + "e2e.css", timeout=5)
    assert plain.read().decode() == static_css("second") and plain.headers["Cache-Control"] == "no-cache"
    assert plain.headers["Server"] == "nginx"  # no version
    admin = urllib.request.urlopen(f"http://127.0.0.1:{target.nginx_port}/admin/login/", timeout=5).read().decode()
    css = re.search(r'href="/static/(admin/css/base\.[0-9a-f]{12}\.css)"', admin)
    assert css and http_get(base + css.group(1))[0] == 200


def test_an_unknown_host_name_gets_no_answer(target):
    status, error = http_get(target.front_url, headers={"Host": "unknown.example.org"})
    assert status is None and "Remote end closed connection" in error, (status, error)
    assert "DisallowedHost" not in (target.srv / "log" / "web-1.log").read_text()


def test_rollback_brings_back_the_previous_release(target):
    current = target.live_release()
    releases = target.releases()
    previous = releases[releases.index(current) - 1]
    out = ok(target.fab("rollback"))
    assert f"{previous} is live" in out
    assert target.live_release() == previous
    assert live_release_over_http(target) == previous
    assert run_ping(target)["release"] == previous
    assert set(target.states().values()) == {"RUNNING"}


def test_a_config_change_reloads_the_group_and_rollback_restores_the_old_config(target, clone):
    before = target.live_release()
    smaller = target.config_file_with(web_workers=1)
    clone.commit_file("docs/config-marker.txt", f"{time.time()}\n", "a deploy with fewer gunicorn workers")
    out = ok(target.fab("deploy", config=smaller, repo=clone.path))
    assert "the programs config changed" in out and "supervisorctl update" in out
    assert 'WEB_WORKERS="1"' in (target.etc / "programs.conf").read_text()
    assert set(target.states().values()) == {"RUNNING"}
    assert live_release_over_http(target) == target.live_release() != before
    out = ok(target.fab("rollback", config=smaller))
    assert f"{before} is live" in out and "the programs config changed" in out
    assert 'WEB_WORKERS="2"' in (target.etc / "programs.conf").read_text()  # the config `before` ran with
    assert live_release_over_http(target) == before and run_ping(target)["release"] == before


def test_plan_shows_the_change_and_touches_nothing(target, clone):
    before = (target.releases(), target.live_release(), (target.etc / "programs.conf").read_text())
    out = ok(target.fab("plan", repo=clone.path))
    assert "venvs/" in out and "reused" in out and "programs.conf unchanged" in out
    assert "migrations:  none new" in out and "commits:" in out  # HEAD is ahead of the rolled-back release
    secret = target.srv.joinpath("shared/env").read_text().split("SECRET_KEY=")[1].split("\n")[0]
    # The secrets reach the programs through shared/env.effective, never through supervisord's config.
    assert "SECRET_KEY" not in before[2] and secret not in before[2]
    drifted = before[2].replace("stopwaitsecs=20", "stopwaitsecs=21")
    (target.etc / "programs.conf").write_text(drifted)
    try:
        out = ok(target.fab("deploy", "--dry-run", repo=clone.path))
        assert "-stopwaitsecs=21" in out and "+stopwaitsecs=20" in out
        assert secret not in out and secret.replace("%", "%%") not in out
    finally:
        (target.etc / "programs.conf").write_text(before[2])
    assert (target.releases(), target.live_release()) == before[:2]


def test_broken_migration_stops_before_the_switch(target, clone):
    live = target.live_release()
    leaf = sorted(p.stem for p in (clone.path / MIGRATIONS).glob("0*.py"))[-1]
    clone.commit_file(
        str(MIGRATIONS / "9999_broken.py"),
        "from django.db import migrations\n\n\n"
        "class Migration(migrations.Migration):\n"
        f"    dependencies = [('prayer_room_api', '{leaf}')]\n"
        "    operations = [migrations.RunSQL('SELECT 1/0', migrations.RunSQL.noop)]\n",
        "a migration that fails",
    )
    try:
        assert "migrations:  9999_broken.py" in ok(target.fab("plan", repo=clone.path))
        result = target.fab("deploy", repo=clone.path)
        line = failed(result)
        assert "(migrate)" in line and "division by zero" in line and f"{live} keeps serving" in line
        assert target.live_release() == live and live_release_over_http(target) == live
        assert not any(r.endswith(clone.git("rev-parse", "HEAD")[:12]) for r in target.releases())
        assert set(target.states().values()) == {"RUNNING"}
    finally:
        clone.revert_head()


def test_failed_verification_rolls_back_automatically(target, clone):
    live = target.live_release()
    tasks = clone.path / "project/prayer_room_api/tasks.py"
    clone.commit_file(
        str(tasks.relative_to(clone.path)),
        tasks.read_text().replace(
            '    return {"release"', '    raise RuntimeError("broken ping")\n    return {"release"'
        ),
        "a worker that cannot run the ping task",
    )
    try:
        with Receiver() as receiver:  # deploy.toml's notify: the failure is announced as one
            result = target.fab("deploy", repo=clone.path, config=target.config_file_with(notify=[receiver.url]))
        line = failed(result)
        assert "rolled back to" in line and live in line and "broken ping" in line
        assert "rolling back to" in result.stdout
        assert target.live_release() == live and live_release_over_http(target) == live
        assert run_ping(target)["release"] == live
        assert [(b["event"], b["result"], b["severity"]) for b in receiver.received] == [("deploy", "failed", "error")]
        assert "deploy FAILED: " in receiver.received[0]["text"] and "broken ping" in receiver.received[0]["message"]
    finally:
        clone.revert_head()


def test_a_second_deploy_is_refused_while_one_runs(target, clone):
    first = target.fab_background("deploy", repo=clone.path)
    seen = output_until(first, "take the deploy lock (")
    second = target.fab("deploy", repo=clone.path)
    rest, _ = first.communicate(timeout=300)
    assert first.returncode == 0, seen + rest
    line = failed(second)
    assert "is locked by" in line and "deploy " in line and "since" in line and "fab unlock" in line
    assert not (target.srv / "deploy.lock").exists()


def test_an_interrupted_deploy_releases_the_lock_and_the_old_release_serves(target, clone):
    live = target.live_release()
    clone.commit_file("docs/interrupted-marker.txt", f"{time.time()}\n", "a deploy to interrupt")
    deploy = target.fab_background("deploy", repo=clone.path)
    seen = output_until(deploy, "-> prepare")
    deploy.send_signal(signal.SIGINT)  # Ctrl-C
    rest, _ = deploy.communicate(timeout=120)
    assert deploy.returncode != 0, seen + rest
    assert not (target.srv / "deploy.lock").exists(), seen + rest
    assert target.live_release() == live and live_release_over_http(target) == live
    assert set(target.states().values()) == {"RUNNING"}


def test_a_stale_lock_is_broken_and_unlock_removes_a_lock(target, clone):
    lock = target.srv / "deploy.lock"
    lock.mkdir()
    (lock / "owner").write_text(json.dumps({"holder": "ghost@laptop", "since": 0, "action": "deploy dead"}))
    out = ok(target.fab("unlock"))
    assert "ghost@laptop" in out and not lock.exists()
    lock.mkdir()
    (lock / "owner").write_text(json.dumps({"holder": "ghost@laptop", "since": 0, "action": "deploy dead"}))
    os.utime(lock / "owner", (time.time() - 3600, time.time() - 3600))
    out = ok(target.fab("deploy", repo=clone.path))
    assert "breaking a stale deploy lock of ghost@laptop" in out and not lock.exists()


def lock_on(target, action: str) -> DeployLock:
    """A DeployLock of our own on the target, over a connection of its own."""
    conn = Connection("127.0.0.1", user="root", port=target.ssh_port, connect_kwargs={"key_filename": str(target.key)})
    conn.client.load_host_keys(str(target.home / ".ssh/known_hosts"))  # the keys the operator trusts
    return DeployLock(connect(conn, load_config(target.config_file, "e2e")), action)


def test_refresh_and_release_touch_only_their_own_lock(target):
    owner = target.srv / "deploy.lock" / "owner"
    mine = lock_on(target, "deploy mine")
    mine.acquire()
    os.utime(owner, (time.time() - 3600, time.time() - 3600))  # mine went stale; another deploy breaks it
    theirs = lock_on(target, "deploy theirs")
    theirs.acquire()
    mine.release()
    assert json.loads(owner.read_text())["token"] == theirs.token, "releasing a lock broken as stale removed theirs"
    with pytest.raises(DeployError, match="lost the deploy lock .*deploy theirs"):
        mine.refresh()
    assert json.loads(owner.read_text())["token"] == theirs.token
    theirs.release()
    assert not owner.parent.exists()


def test_the_heartbeat_keeps_the_lock_alive_during_a_long_step_on_the_same_connection(target):
    owner = target.srv / "deploy.lock" / "owner"
    lock = lock_on(target, "deploy long")
    lock.acquire()
    try:
        os.utime(owner, (time.time() - 3600, time.time() - 3600))  # as if the lock had been idle an hour
        with LockKeeper([lock], interval=0.5) as keeper:
            # A long step holds the SSH connection meanwhile (as a virtualenv build does).
            lock.server.root("sleep 3", what="a long step")
            keeper.check()
        assert time.time() - owner.stat().st_mtime < 5, "the lock was not refreshed during the step"
        assert not keeper.thread.is_alive(), "the heartbeat went on after its block"
        # A lock lost meanwhile (broken as stale, taken by another deploy) stops the command at its next step.
        os.utime(owner, (time.time() - 3600, time.time() - 3600))
        theirs = lock_on(target, "deploy theirs")
        theirs.acquire()
        with LockKeeper([lock], interval=0.2) as keeper:
            deadline = time.monotonic() + 10
            while keeper.failure is None and time.monotonic() < deadline:
                time.sleep(0.1)
            with pytest.raises(DeployError, match="lost the deploy lock .*deploy theirs"):
                keeper.check()
        theirs.release()
    finally:
        lock.release()
        shutil.rmtree(owner.parent, ignore_errors=True)


def test_two_deploys_breaking_one_stale_lock_one_wins(target):
    lock = target.srv / "deploy.lock"
    lock.mkdir()
    (lock / "owner").write_text(json.dumps({"holder": "ghost@laptop", "since": 0, "action": "deploy dead"}))
    os.utime(lock / "owner", (time.time() - 3600, time.time() - 3600))
    locks = [lock_on(target, f"deploy {n}") for n in range(2)]
    outcomes = []

    def take(one):
        try:
            one.acquire()
            outcomes.append("took")
        except DeployError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=take, args=(one,)) for one in locks]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert outcomes.count("took") == 1, outcomes
        assert any("is locked by root@" in outcome and "(deploy " in outcome for outcome in outcomes), outcomes
        [winner] = [one for one in locks if json.loads((lock / "owner").read_text())["token"] == one.token]
        winner.release()
        assert not lock.exists()
    finally:
        shutil.rmtree(lock, ignore_errors=True)


def test_restart_and_rollback_wait_for_the_lock(target):
    lock = target.srv / "deploy.lock"
    lock.mkdir()
    (lock / "owner").write_text(json.dumps({"holder": "alice@laptop", "since": int(time.time()), "action": "deploy"}))
    try:
        for task in (("restart", "--program", "worker"), ("rollback",)):
            line = failed(target.fab(*task))
            assert "is locked by alice@laptop" in line, (task, line)
    finally:
        shutil.rmtree(lock)


def test_a_sudo_user_deploys_and_rolls_back(target, clone):
    ensure_sudoer(SUDO_USER)
    host = f"{SUDO_USER}@127.0.0.1:{target.ssh_port}"
    before = target.live_release()
    clone.commit_file("docs/sudo-marker.txt", f"{time.time()}\n", "a deploy by a sudo user")
    ok(target.fab("deploy", hosts=host, repo=clone.path))
    after = target.live_release()
    assert after != before and live_release_over_http(target) == after
    assert (target.srv / "releases" / after).owner() == "root"  # read-only to the app user
    assert f"{before} is live" in ok(target.fab("rollback", hosts=host))
    assert live_release_over_http(target) == before


def test_status_logs_restart_and_supervisorctl(target):
    live = target.live_release()
    out = ok(target.fab("status"))
    # One table, as for a site of several hosts: the host, its roles, its release, each program's state.
    for program in ("web-1", "web-2", "worker", "beat"):
        assert re.search(rf"^127\.0\.0\.1:\d+\s+web,worker,beat,db\s+{live}\s+{program}\s+RUNNING", out, re.M), out
    assert re.search(rf"^  {live}  \(live\)$", out, re.M), out
    assert "schedules (beat, DatabaseScheduler):" in out
    # One line per schedule, with its last run.
    assert re.search(
        r"^  on  moderator-digest-hourly: \S+ 0 \* \* \* \* .*\(last run (never|\d{4}-.+)\)$", out, re.M
    ), out
    assert "Starting gunicorn" in ok(target.fab("logs", "--program", "web-1", "--lines", "200"))
    every = ok(target.fab("logs", "--lines", "200"))
    assert "Starting gunicorn" in every and "beat: Starting..." in every, "without --program: all of them"
    out = ok(target.fab("restart", "--program", "web"))
    assert "restart web-1" in out and "restart web-2" in out
    assert "RUNNING" in ok(target.fab("supervisorctl", "status prayer-room:beat"))
    assert "unknown program 'flower'" in failed(target.fab("logs", "--program", "flower"))


def test_bad_input_is_one_line_and_changes_nothing(target, clone, tmp_path):
    before = (target.releases(), target.live_release())
    assert "unknown environment 'nope'" in failed(target.fab("deploy", env="nope", repo=clone.path))
    (clone.path / "uncommitted.txt").write_text("x")
    try:
        assert "uncommitted changes (uncommitted.txt)" in failed(target.fab("deploy", repo=clone.path))
    finally:
        (clone.path / "uncommitted.txt").unlink()
    other_key = tmp_path / "other_key"
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {other_key}")
    wrong = target.fab("deploy", repo=clone.path, key=other_key)
    assert "SSH refused the login" in failed(wrong)
    closed = target.fab("status", hosts="root@127.0.0.1:1")
    assert "cannot connect over SSH" in failed(closed)
    ensure_user(NO_SUDO_USER, shell="/bin/sh")
    no_sudo = target.fab("deploy", hosts=f"{NO_SUDO_USER}@127.0.0.1:{target.ssh_port}", repo=clone.path)
    assert f"{NO_SUDO_USER} cannot sudo without a password" in failed(no_sudo)
    # The systemd check runs before the app user's: with no such user, a deploy stops at one or the other.
    systemd_config = target.config_file_with(require_systemd=True, user="prayer-room-absent")
    systemd = failed(target.fab("deploy", config=systemd_config, repo=clone.path))
    if Path("/run/systemd/system").is_dir():  # this host runs systemd
        assert "does not run systemd" not in systemd and "no app user 'prayer-room-absent'" in systemd
    else:
        assert "does not run systemd" in systemd
    assert (target.releases(), target.live_release()) == before


def one_host_roles_config(target: DeployTarget) -> Path:
    """The e2e environment with its one host named under every role (web, worker, beat, db) instead of `hosts`."""
    path = target.config_file_with()
    host = f"root@127.0.0.1:{target.ssh_port}"
    roles = f'roles = {{ web = ["{host}"], worker = ["{host}"], beat = ["{host}"], db = ["{host}"] }}'
    lines = [roles if line.startswith("hosts = ") else line for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_roles_table_naming_one_host_is_the_same_site_as_hosts(target, clone):
    config = one_host_roles_config(target)
    before = target.live_release()
    live_programs = (target.etc / "programs.conf").read_text()
    clone.commit_file("project/prayer_room_api/e2e_one_host.txt", "one host\n", "a change for the one-host site")
    # -H naming the site's one host is that site, as with `hosts`.
    out = ok(target.fab("deploy", config=config, hosts=f"root@127.0.0.1:{target.ssh_port}", repo=clone.path))
    after = target.live_release()
    assert after != before and live_release_over_http(target) == after and f"{after} is live" in out
    # Rendered as for `hosts = [...]`: the same programs config (no per-host queue), so a rolling restart.
    assert (target.etc / "programs.conf").read_text() == live_programs and "restart web-1" in out
    table = ok(target.fab("status", config=config))
    assert after in table and re.search(r"worker\s+RUNNING", table) and "schedules (beat, DatabaseScheduler):" in table
    assert "restarted" in ok(target.fab("restart", "--program", "worker", config=config))
    out = ok(target.fab("rollback", config=config))
    assert f"{before} is live" in out and live_release_over_http(target) == before


def test_the_app_user_cannot_plant_static_files_while_collectstatic_runs(target, clone):
    clone.commit_file(STATIC_CSS, static_css("third"), "a stylesheet changed: collectstatic has a new file")
    stop = target.workdir / "stop-static-attacker"
    attacker = subprocess.Popen(
        ["/usr/bin/python3", "-c", STATIC_ATTACKER.read_text(), str(target.srv / "releases"), str(stop)],
        user=APP_USER, group=APP_USER, extra_groups=[], cwd="/tmp", stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert attacker.stdout.readline() == "watching\n"  # it listed the releases there before the deploy
        out = ok(target.fab("deploy", repo=clone.path))
    finally:
        stop.touch()
        found = json.loads(attacker.communicate(timeout=30)[0].splitlines()[-1])
    release = target.live_release()
    print(f"static attacker: {json.dumps({**found, 'planted': found['planted'][:5]})}")
    assert "ok  collectstatic" in out
    assert found["rounds_before_root_took_it"] > 0, found  # it raced collectstatic, not only the sealed result
    assert found["planted"] == [], found["planted"][:10]
    static = target.srv / "releases" / release / "static"
    assert not list(static.rglob("planted.js")) and all(p.lstat().st_uid == 0 for p in static.rglob("*"))
    base = f"http://127.0.0.1:{target.nginx_port}/static/"
    assert http_get(base + "planted.js")[0] == 404
    assert urllib.request.urlopen(base + "e2e.css", timeout=5).read().decode() == static_css("third")


# --- README promises checked through `fab` and the server's files and processes ----------------------------------


def program_pids(target: DeployTarget) -> dict[str, str]:
    """The pid of each running program, from `supervisorctl status` (`NAME RUNNING pid 123, uptime ...`)."""
    lines = map(str.split, target.supervisorctl("status").stdout.splitlines())
    return {words[0]: words[3].rstrip(",") for words in lines if words[1:3] == ["RUNNING", "pid"]}


def test_a_layout_directory_not_roots_is_refused_says_why_and_changes_nothing(target, clone):
    clone.commit_file("docs/layout-marker.txt", f"{time.time()}\n", "a deploy to a layout that is not root's")
    app = pwd.getpwnam(APP_USER)
    for directory, weaken, undo in (
        (target.srv / "releases", lambda d: os.chown(d, app.pw_uid, app.pw_gid), lambda d: os.chown(d, 0, 0)),
        (target.srv / "venvs", lambda d: d.chmod(0o775), lambda d: d.chmod(0o755)),
    ):
        before = (target.releases(), target.live_release(), program_pids(target), sorted(os.listdir(target.srv)))
        weaken(directory)
        try:
            line = failed(target.fab("deploy", repo=clone.path))
            assert str(directory) in line and "must be root's and writable by root alone" in line, line
            assert "run `fab provision`" in line, line
            after = (target.releases(), target.live_release(), program_pids(target), sorted(os.listdir(target.srv)))
            assert after == before  # no release uploaded, nothing restarted, no lock left behind
        finally:
            undo(directory)
    assert not target.live_release().endswith(clone.git("rev-parse", "HEAD")[:12])
    ok(target.fab("deploy", repo=clone.path))  # the same deploy goes through once the layout is root's again
    assert target.live_release().endswith(clone.git("rev-parse", "HEAD")[:12])


def test_a_deploy_restarts_the_programs_but_never_supervisord(target, clone):
    supervisord = target.supervisorctl("pid").stdout.strip()
    programs = program_pids(target)
    assert supervisord.isdigit() and len(programs) == 4, (supervisord, programs)
    log = target.srv / "log" / "supervisord.log"
    seen = log.stat().st_size
    clone.commit_file("docs/pid-marker.txt", f"{time.time()}\n", "a code-only deploy")
    ok(target.fab("deploy", repo=clone.path))
    assert target.supervisorctl("pid").stdout.strip() == supervisord
    with log.open() as lines:
        lines.seek(seen)
        logged = lines.read()
    assert "spawned: 'web-1'" in logged, logged  # its log, read from where the deploy began
    assert "restart request" not in logged and "supervisord started with pid" not in logged, logged  # no reload
    after = program_pids(target)
    assert after.keys() == programs.keys() and all(after[name] != programs[name] for name in programs), (
        programs,
        after,
    )


def test_rollback_to_a_named_release(target):
    live = target.live_release()
    releases = target.releases()
    verified = [r for r in releases if (target.srv / "releases" / r / ".deployed").exists() and r < live]
    assert len(verified) >= 2, releases
    chosen = verified[-2]  # not the one a plain rollback picks
    line = failed(target.fab("rollback", "--to", "20000101000000-000000000000"))
    assert "no release 20000101000000-000000000000" in line and target.live_release() == live
    out = ok(target.fab("rollback", "--to", chosen))
    assert f"{chosen} is live" in out
    assert target.live_release() == chosen and live_release_over_http(target) == chosen
    assert run_ping(target)["release"] == chosen
    assert set(target.states().values()) == {"RUNNING"}


def test_rollback_refuses_a_release_from_before_the_redis_key_prefix(target):
    """A release fabricated from the live one, its settings file as before the prefix (no REDIS_KEY_PREFIX): `fab
    rollback --to` it is refused in one line naming it, before any switch or restart; the live release still serves.
    Control: the same release with the line back passes the kit's check over SSH."""
    live = target.live_release()
    pids = target.supervisorctl("pid", "all").stdout
    fake = "20000101000000-0ld0prefix00"
    fake_dir = target.srv / "releases" / fake
    settings = fake_dir / REDIS_PREFIX_SETTINGS
    try:
        subprocess.run(["cp", "-a", str(target.srv / "releases" / live), str(fake_dir)], check=True)
        text = settings.read_text()
        assert REDIS_PREFIX_LINE in text.splitlines() and (fake_dir / ".deployed").exists()
        settings.write_text("".join(line for line in text.splitlines(True) if "REDIS_KEY_PREFIX" not in line))
        line = failed(target.fab("rollback", "--to", fake))
        assert f"refusing to roll back to {fake}" in line and "predates the Redis key prefix" in line, line
        assert "`fab rollback --to`" in line and "`fab deploy`" in line
        assert target.live_release() == live and live_release_over_http(target) == live
        assert (target.srv / "releases" / live / ".deployed").exists()  # not unmarked: no switch happened
        assert set(target.states().values()) == {"RUNNING"}
        assert target.supervisorctl("pid", "all").stdout == pids  # no program was restarted

        settings.write_text(text)  # the positive control: the kit's own check, over SSH, finds it prefixed
        conn = Connection(
            "127.0.0.1", user="root", port=target.ssh_port, connect_kwargs={"key_filename": str(target.key)}
        )
        conn.client.load_host_keys(str(target.home / ".ssh/known_hosts"))
        try:
            server = connect(conn, load_config(target.config_file, "e2e"))
            assert uses_redis_prefix(server, fake) is True
            settings.write_text("".join(line for line in text.splitlines(True) if "REDIS_KEY_PREFIX" not in line))
            assert uses_redis_prefix(server, fake) is False
        finally:
            conn.close()
    finally:
        shutil.rmtree(fake_dir, ignore_errors=True)  # later tests' plain rollbacks must not pick it


def test_a_virtualenv_holding_a_file_not_roots_is_rebuilt_not_reused(target, clone):
    venv = (target.srv / "current" / ".venv").resolve()
    [site_packages] = venv.glob("lib/python3*/site-packages")
    planted = site_packages / "zz-planted.pth"
    planted.write_text("import os\n")
    app = pwd.getpwnam(APP_USER)
    os.chown(planted, app.pw_uid, app.pw_gid)  # what the app user could leave in a virtualenv it could write
    clone.commit_file("docs/venv-marker.txt", f"{time.time()}\n", "a deploy with requirements.lock unchanged")
    out = ok(target.fab("deploy", repo=clone.path))
    assert f"build virtualenv venvs/{venv.name}" in out and "reused" not in out, out
    assert (target.srv / "current" / ".venv").resolve() == venv
    assert not planted.exists() and all(path.lstat().st_uid == 0 for path in venv.rglob("*"))
    assert live_release_over_http(target) == target.live_release()


def test_the_lock_is_kept_alive_during_a_step_longer_than_its_expiry(target, clone):
    """While a deploy step runs (seed_schedules made to take 30 s), its lock's owner record is dated an hour back, as
    if the step had outlasted lock_expiry_seconds (60) sixty times: the heartbeat (every 60 / 4 s) dates it again
    before the step ends, so a second deploy is refused, not let in to break a stale lock."""
    config = target.config_file_with(lock_expiry_seconds=60)
    heartbeat = 60 / 4
    seed = "project/prayer_room_api/management/commands/seed_schedules.py"
    handle = "    def handle(self, *args, check=False, **options):\n"
    text = (clone.path / seed).read_text()
    assert handle in text
    clone.commit_file(seed, text.replace(handle, handle + "        __import__('time').sleep(30)\n"), "a slow step")
    try:
        first = target.fab_background("deploy", repo=clone.path, config=config)
        seen = output_until(first, "-> prepare: migrate, seed_schedules")
        owner = target.srv / "deploy.lock" / "owner"
        stale = time.time() - 3600
        os.utime(owner, (stale, stale))  # idle an hour as far as any other deploy can tell
        backdated = time.monotonic()
        while owner.stat().st_mtime < stale + 600:  # until the heartbeat dates it again
            assert first.poll() is None, seen
            assert time.monotonic() - backdated < heartbeat + 10, "the heartbeat did not refresh the lock"
            time.sleep(0.2)
        assert first.poll() is None, seen  # refreshed while the step ran
        assert time.time() - owner.stat().st_mtime < 60
        line = failed(target.fab("deploy", repo=clone.path, config=config))
        assert "is locked by" in line and "fab unlock" in line, line
        rest, _ = first.communicate(timeout=300)
        assert first.returncode == 0, seen + rest
        assert "lost the deploy lock" not in rest and "breaking a stale deploy lock" not in seen + rest
        assert target.live_release().endswith(clone.git("rev-parse", "HEAD")[:12])
    finally:
        clone.revert_head()


def test_keep_releases_keeps_the_newest_releases_and_only_their_virtualenvs(target, clone):
    config = target.config_file_with(keep_releases=2)
    old_venvs = sorted(os.listdir(target.srv / "venvs"))
    assert len(target.releases()) > 2, target.releases()
    lock = clone.path / "requirements.lock"
    clone.commit_file("requirements.lock", lock.read_text() + "# a new virtualenv\n", "requirements.lock changed")
    ok(target.fab("deploy", repo=clone.path, config=config))
    first = target.live_release()
    clone.commit_file("docs/keep-marker.txt", f"{time.time()}\n", "a second deploy with the new virtualenv")
    ok(target.fab("deploy", repo=clone.path, config=config))
    second = target.live_release()
    assert target.releases() == [first, second]
    venvs = sorted(os.listdir(target.srv / "venvs"))
    used = {os.readlink(target.srv / "releases" / r / ".venv").rstrip("/").rsplit("/", 1)[-1] for r in (first, second)}
    assert venvs == sorted(used) and len(venvs) == 1 and venvs[0] not in old_venvs, (old_venvs, venvs)
    assert live_release_over_http(target) == second


def answer(target: DeployTarget, method: str = "GET") -> tuple[int | None, str | None, str]:
    """Status, Retry-After and body of a GET (or a JSON POST) of /health/ through the provisioned nginx site."""
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(target.front_url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Retry-After"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Retry-After"], exc.read().decode()


MESSAGE = 'Back at 10:00 <b>"soon"</b> & $HOME'


def shows_the_page(target: DeployTarget, method: str = "GET") -> bool:
    """Whether nginx answers 503, Retry-After 30 and the operator's page with MESSAGE escaped."""
    status, retry, body = answer(target, method)
    return (status, retry) == (
        503,
        "30",
    ) and "<p>Back at 10:00 &lt;b&gt;&#34;soon&#34;&lt;/b&gt; &amp; $HOME</p>" in body


def test_maintenance_is_503_with_the_message_through_deploys_and_windows_until_off(target, clone):
    """The operator's page: every method gets 503 with Retry-After and the (escaped) message; a deploy and the kit's
    own maintenance window leave it up; `fab maintenance off` serves again; `fab status` shows it."""
    assert "say `fab maintenance on" in failed(target.fab("maintenance", "sideways"))
    assert "--message goes with `fab maintenance on`" in failed(target.fab("maintenance", "off", "--message", "x"))
    assert "one line of plain text" in failed(target.fab("maintenance", "on", "--message", "two\nlines"))
    assert answer(target)[0] == 200
    started = time.monotonic()
    out = ok(target.fab("maintenance", "on", "--message", MESSAGE))
    on_seconds = time.monotonic() - started
    assert "maintenance is on: every request gets 503 until `fab maintenance off`" in out
    assert shows_the_page(target, "GET") and shows_the_page(target, "POST")
    status = ok(target.fab("status"))
    assert re.search(r"^maintenance: on since \S+Z \(by root@\S+\): Back at 10:00 <b>", status, re.M), status

    out = ok(target.fab("deploy", repo=clone.path))  # verified on the web ports, behind the page
    assert target.live_release() in out and shows_the_page(target)

    conn = Connection("127.0.0.1", user="root", port=target.ssh_port, connect_kwargs={"key_filename": str(target.key)})
    conn.client.load_host_keys(str(target.home / ".ssh/known_hosts"))
    with window(connect(conn, load_config(target.config_file, "e2e")), Progress("w", out=io.StringIO()), "a test"):
        assert (target.srv / "maintenance-on").exists() and shows_the_page(target)
    conn.close()
    assert not (target.srv / "maintenance-on").exists() and shows_the_page(target)  # the window left it up

    started = time.monotonic()
    out = ok(target.fab("maintenance", "off"))
    off_seconds = time.monotonic() - started
    assert "maintenance is off" in out and "(it was not on)" not in out
    status, retry, body = answer(target)
    assert (status, retry) == (200, None) and json.loads(body)["release"] == target.live_release()
    assert re.search(r"^maintenance: off$", ok(target.fab("status")), re.M)
    ARTIFACTS.mkdir(exist_ok=True)
    timings = {"fab maintenance on": round(on_seconds, 2), "fab maintenance off": round(off_seconds, 2)}
    (ARTIFACTS / "maintenance-e2e-timings.json").write_text(json.dumps(timings, indent=1) + "\n")


def test_history_lists_the_deploys_rollbacks_and_maintenance_and_only_root_appends_to_it(target):
    out = ok(target.fab("history", "--lines", "500"))
    print(out)
    assert out.splitlines()[0].split() == ["WHEN", "(UTC)", "EVENT", "RESULT", "TIME", "WHO", "WHAT"], out
    rows = history_rows(out)
    assert [row[1] for row in rows[-3:]] == ["maintenance on", "deploy", "maintenance off"], out
    # WHO: the local user@host and the git identity, the shipped checkout's for a deploy, the operator's otherwise.
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    by_clone, by_operator = (f"{who} ({name} <{email}>)" for name, email in (CLONE_AUTHOR, OPERATOR))
    assert {row[1] for row in rows} >= {"deploy", "rollback", "env", "maintenance on", "maintenance off"}, out
    assert all(row[4] == (by_clone if row[1] == "deploy" else by_operator) for row in rows), out
    assert all(row[2] == "ok" and re.fullmatch(r"[\d.]+ s", row[3]) for row in rows[-3:]), out
    assert rows[-3][5].endswith(MESSAGE)  # the operator's text as typed
    assert rows[-2][5].startswith(f"{target.live_release()}; commit ") and rows[-2][4].startswith("root@")
    rollbacks = [row for row in rows if row[1] == "rollback" and row[2] == "ok"]
    assert rollbacks and all(re.search(r"; from \d{14}-", row[5]) for row in rollbacks), out
    assert [row[1] for row in history_rows(ok(target.fab("history", "--lines", "2")))] == ["deploy", "maintenance off"]
    env_changes = [row[5] for row in rows if row[1] == "env" and row[2] == "ok"]
    assert any(what.endswith("--set PRAYER_ROOM_E2E_FLAG --set PRAYER_ROOM_E2E_NOTE") for what in env_changes), out

    log = target.srv / "log" / "history.jsonl"
    info = log.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, 0, 0o600)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert "a b=c" not in log.read_text()  # an env change records its keys, never a value
    assert all({"event", "host", "result", "message", "release", "time", "who", "seconds"} <= set(r) for r in records)
    append = f": >> {log}"  # opens the log for appending, writes nothing
    app = subprocess.run(["runuser", "-u", APP_USER, "--", "sh", "-c", append], capture_output=True, text=True)
    assert app.returncode != 0 and "Permission denied" in app.stderr, app
    assert subprocess.run(["sh", "-c", append]).returncode == 0  # positive control: root can
