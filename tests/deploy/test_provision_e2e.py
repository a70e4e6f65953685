"""`fab provision` then `fab deploy` on a fresh Debian 13 and a fresh Debian 12 booted with systemd-nspawn, over real
SSH, then a reboot.

The tests share one container per release and run in file order on each: refusals on the fresh server (nothing
changed), provision (as a sudo user), provision again (as root: nothing changed), deploy, reboot.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from prayer_room_api.schedules import SCHEDULES
from tests.support.admin_http import admin_page, sign_in_to_admin, signed_in
from tests.support.nspawn import RELEASES, Container, build_rootfs, missing_tools, operator_env
from tests.support.pty_session import PtySession
from tests.support.webhook import Receiver

REPO = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).with_name("fab")
ARTIFACTS = REPO / "test-artifacts"
APP_USER = "prayer-room"
SUPERVISORCTL = "supervisorctl"  # as root, without -c: provision's /etc/supervisord.conf names the socket
PROGRAMS = {"prayer-room:web-1", "prayer-room:web-2", "prayer-room:worker", "prayer-room:beat"}

pytestmark = [pytest.mark.deploy, pytest.mark.skipif(bool(missing_tools()), reason=str(missing_tools()))]
timings: dict[str, float] = {}


@pytest.fixture(scope="module", params=list(RELEASES))
def vps(request, tmp_path_factory):
    """A fresh server of each release in turn (every test of the module on one, then on the next)."""
    container = Container(tmp_path_factory.mktemp(f"vps-{request.param}")).create(build_rootfs(request.param))
    container.add_user("admin", sudo=True)
    container.add_user("nosudo", sudo=False)
    container.boot()
    yield container
    container.destroy()
    if timings:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"provision-e2e-timings-{request.param}.json").write_text(json.dumps(timings, indent=1) + "\n")
        timings.clear()


def fab(vps: Container, *args: str, user: str = "root", key: Path | None = None, host: str | None = None, timeout=900):
    """Run the real `fab` command line against the container, as an operator would."""
    command = [str(FAB), "-H", f"{user}@{host or vps.address}", "-i", str(key or vps.key), *args]
    env = operator_env(vps.workdir / "operator", vps)  # its known_hosts trusts the container; no SSH agent
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def server_answer(url: str) -> tuple[int | None, str]:
    """http_get, but an answer not from the container's nginx (its Server header) is no answer (None, what came).

    NOTE: while a container is down its address is routed out of the test host, where this host's network may
    answer HTTP itself (a proxy's 404 was seen): that is not the server answering.
    """
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status, headers = response.status, response.headers
    except urllib.error.HTTPError as exc:
        status, headers = exc.code, exc.headers
    except OSError as exc:
        return None, str(exc)
    if headers.get("Server") != "nginx":
        return None, f"HTTP {status} from {headers.get('Server')!r}, not the server's nginx"
    return status, ""


def http_get(url: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError as exc:
        return None, str(exc)


def untouched(vps: Container) -> None:
    command = f"dpkg-query -W nginx; getent passwd {APP_USER}; ls -A /srv; ls -d /etc/prayer-room 2>/dev/null"
    state = vps.ssh(command, check=False)
    assert state.stdout.strip() == "", state.stdout


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and all(part in lines[0] for part in expected), lines[0]


def test_a_wrong_key_is_refused_and_nothing_changes(vps, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    assert_one_line_error(fab(vps, "provision", key=other), "SSH refused the login", "-i KEY")
    untouched(vps)


def test_a_user_without_sudo_is_refused_and_nothing_changes(vps):
    assert_one_line_error(fab(vps, "provision", user="nosudo"), "nosudo cannot sudo without a password")
    untouched(vps)


def test_an_unreachable_host_is_refused(vps):
    unused = vps.address.rsplit(".", 1)[0] + ".200"  # on the container's link, but nobody there
    started = time.monotonic()
    assert_one_line_error(fab(vps, "provision", host=unused, timeout=60), "cannot connect over SSH")
    assert time.monotonic() - started < 30


def test_a_server_without_systemd_is_refused_and_nothing_changes(tmp_path):
    bare = Container(tmp_path).create(build_rootfs())
    try:
        bare.boot(init=False)  # sshd is PID 1
        assert_one_line_error(fab(bare, "provision"), "does not run systemd", "Debian 13 or 12")
        untouched(bare)
    finally:
        bare.destroy()


def test_provision_takes_a_fresh_server_to_a_ready_one(vps):
    started = time.monotonic()
    result = fab(vps, "provision", user="admin")  # a sudo user; the re-run below is as root
    timings["provision, first run"] = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 of 12 steps changed the server" in result.stdout, result.stdout

    env = vps.ssh("stat -c '%U:%G %a' /srv/prayer-room/shared/env; cat /srv/prayer-room/shared/env").stdout
    assert env.startswith(f"root:{APP_USER} 640\n")
    secret = next(line.split("=", 1)[1] for line in env.splitlines() if line.startswith("SECRET_KEY="))
    assert len(secret) >= 50 and secret not in result.stdout + result.stderr
    assert f"ALLOWED_HOSTS={vps.address}," in env and "SECURE_SSL_REDIRECT=false" in env

    checks = {
        "unit enabled and running": "systemctl is-enabled prayer-room && systemctl is-active prayer-room",
        "postgres, redis, nginx come back on boot": "systemctl is-enabled postgresql redis-server nginx",
        "socket root's, in a root-only directory": "stat -c '%U %a' /run/prayer-room /run/prayer-room/supervisor.sock"
        " | uniq | grep -x 'root 700'",
        "supervisord config is root's": "stat -c '%U %a' /etc/prayer-room/supervisord.conf | grep -x 'root 644'"
        f" && ! runuser -u {APP_USER} -- test -w /etc/prayer-room/supervisord.conf",
        "no TCP control port": "! grep -q '^.inet_http_server' /etc/prayer-room/supervisord.conf",
        "root's plain supervisorctl reaches supervisord": f"{SUPERVISORCTL} pid",
        "the app user cannot": f"! runuser -u {APP_USER} -- {SUPERVISORCTL} pid",
        "redis refuses a connection without the password": "redis-cli -h 127.0.0.1 ping 2>&1 | grep -q NOAUTH",
        "redis accepts the env file's login (the app's ACL user)": "REDISCLI_AUTH=\"$(sed -n 's/^CELERY_BROKER_URL="
        "redis:..[^:]*:\\([^@]*\\)@.*/\\1/p' /srv/prayer-room/shared/env)\""
        f" redis-cli -h 127.0.0.1 --user {APP_USER} ping | grep -qx PONG",
        "database login with the env file's DATABASE_URL": f"cd / && runuser -u {APP_USER} -- psql -tA "
        "\"$(sed -n 's/^DATABASE_URL=//p' /srv/prayer-room/shared/env)\" -c 'select current_user'",
    }
    for what, command in checks.items():
        outcome = vps.ssh(command, check=False)
        assert outcome.returncode == 0, f"{what}: {outcome.stdout}{outcome.stderr}"

    # apt's configuration, as unattended-upgrades reads it, allows the release's security suite and nothing else
    # (`unattended-upgrade --dry-run` says the same, in 17 to 21 s: too slow to run here each time).
    codename = vps.ssh(". /etc/os-release && echo $VERSION_CODENAME").stdout.strip()
    dump = vps.ssh("apt-config dump | grep '^Unattended-Upgrade::Origins-Pattern::'", check=False).stdout
    wanted = f"origin=Debian,codename={codename}-security,label=Debian-Security"
    assert dump.splitlines() == [f'Unattended-Upgrade::Origins-Pattern:: "{wanted}";'], dump
    timers = vps.ssh("systemctl is-enabled apt-daily.timer apt-daily-upgrade.timer").stdout.split()
    assert timers == ["enabled", "enabled"], timers

    assert http_get(f"http://{vps.address}/static/admin/css/base.css")[0] == 404  # no release yet
    assert http_get(f"http://{vps.address}/")[0] == 502  # nginx proxies; nothing deployed yet


def test_provision_again_changes_nothing(vps):
    before = vps.ssh("md5sum /srv/prayer-room/shared/env /etc/prayer-room/* /etc/nginx/sites-enabled/*").stdout
    pid = vps.ssh("systemctl show -p MainPID --value prayer-room").stdout
    started = time.monotonic()
    result = fab(vps, "provision")
    timings["provision, second run"] = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing changed, the server was already provisioned" in result.stdout, result.stdout
    assert " changed " not in result.stdout
    assert vps.ssh("md5sum /srv/prayer-room/shared/env /etc/prayer-room/* /etc/nginx/sites-enabled/*").stdout == before
    assert vps.ssh("systemctl show -p MainPID --value prayer-room").stdout == pid  # supervisord not restarted

    started = time.monotonic()
    status = fab(vps, "status")  # before the first deploy: the daily timer waits for its first run
    timings["status before the first deploy"] = time.monotonic() - started
    assert status.returncode == 0, status.stdout + status.stderr
    backups = next((line for line in status.stdout.splitlines() if line.startswith("backups:")), status.stdout)
    assert re.match(r"backups: none yet; the daily timer takes the first in \d+ (s|min|h) ", backups), backups
    assert "fab provision" not in status.stdout, status.stdout
    assert re.search(r"^updates: .*; package lists fetched 0 h ago", status.stdout, re.M), status.stdout  # provision's


def test_debians_own_supervisor_service_is_masked(vps):
    """Masked, not only disabled: its stop command (`supervisorctl shutdown`) would reach the app's supervisord."""
    assert vps.ssh("dpkg-query -W -f '${Status}' supervisor").stdout == "install ok installed"
    assert vps.ssh("test -f /lib/systemd/system/supervisor.service", check=False).returncode == 0  # Debian's unit
    state = vps.ssh("systemctl is-enabled supervisor.service; systemctl is-active supervisor.service", check=False)
    assert state.stdout.split() == ["masked", "inactive"], state.stdout
    refused = vps.ssh("systemctl start supervisor.service", check=False)
    assert refused.returncode != 0 and "masked" in refused.stderr, refused.stderr
    assert vps.ssh("systemctl is-active prayer-room").stdout.strip() == "active"


class Answers:
    """GETs `url` back to back in a thread, keeping (seconds since the start, status or None for no answer)."""

    def __init__(self, url: str):
        self.url, self.seen, self.stop, self.foreign = url, [], threading.Event(), set()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            status, what = server_answer(self.url)
            self.seen.append((time.monotonic() - self.started, status))
            if what.startswith("HTTP"):
                self.foreign.add(what)
            time.sleep(0.05 if status else 0.2)

    def __enter__(self) -> Answers:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)

    def wait_for(self, status: int, count: int, timeout: float = 60) -> None:
        """Until `count` more answers with `status` have come."""
        until, deadline = len(self.seen), time.monotonic() + timeout
        while sum(1 for _, s in self.seen[until:] if s == status) < count:
            assert time.monotonic() < deadline, f"no {count} x {status} in {timeout} s: {self.seen[-5:]}"
            time.sleep(0.1)

    def statuses(self) -> list[int | None]:
        return [status for _, status in self.seen]

    def outage(self) -> dict[str, object]:
        """From the first answer other than 200 to the next 200: its length, how long of it 503 and no answer."""
        bad = [i for i, (_, status) in enumerate(self.seen) if status != 200]
        if not bad:
            return {"seconds": 0, "first failure": None}
        first, last = bad[0], bad[-1]
        seconds = lambda a, b: round(self.seen[b][0] - self.seen[a][0], 1)  # noqa: E731
        spans = {"503": 0.0, "no answer": 0.0}
        for i in range(first, min(last + 1, len(self.seen) - 1)):
            key = "no answer" if self.seen[i][1] is None else "503" if self.seen[i][1] == 503 else "other"
            spans[key] = spans.get(key, 0.0) + self.seen[i + 1][0] - self.seen[i][0]
        return {
            "seconds": seconds(first, min(last + 1, len(self.seen) - 1)),
            "first failure": self.seen[first][1],
            "failed requests": len(bad),
            "requests": len(self.seen),
            **{f"seconds {key}": round(value, 1) for key, value in spans.items()},
            "answers not from the server": sorted(self.foreign),
        }


def running_programs(vps: Container) -> set[str]:
    status = vps.ssh(f"{SUPERVISORCTL} status", check=False).stdout
    return {words[0] for words in map(str.split, status.splitlines()) if words[1:2] == ["RUNNING"]}


def wait_until_serving(vps: Container, timeout: float = 180) -> float:
    """Seconds until nginx answers /health/ with 200 and all programs are RUNNING."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if http_get(f"http://{vps.address}/health/")[0] == 200 and running_programs(vps) >= PROGRAMS:
            return time.monotonic() - started
        time.sleep(0.5)
    status = vps.ssh(f"{SUPERVISORCTL} status", check=False).stdout
    raise AssertionError(f"not serving after {timeout} s: {http_get(f'http://{vps.address}/health/')} {status}")


def test_deploy_then_the_site_answers_and_survives_a_reboot(vps):
    supervisord = vps.ssh("systemctl show -p MainPID --value prayer-room").stdout
    started = time.monotonic()
    result = fab(vps, "deploy", "--allow-dirty")
    timings["deploy"] = time.monotonic() - started
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert vps.ssh("systemctl show -p MainPID --value prayer-room").stdout == supervisord  # programs, not supervisord
    wait_until_serving(vps, timeout=30)
    status, body = http_get(f"http://{vps.address}/health/")
    assert status == 200, body
    # nginx (as www-data) reads the release's own collected static files
    assert http_get(f"http://{vps.address}/static/admin/css/base.css")[0] == 200

    # The reboot is `fab os-update --reboot`'s, from inside (systemd-nspawn exits with 133, the harness boots it
    # again as a hypervisor would), under a loop of GETs through nginx.
    with vps.rebooting_on_request() as exits, Answers(f"http://{vps.address}/health/") as answers:
        answers.wait_for(200, 3)
        started = time.monotonic()
        result = fab(vps, "os-update", "--reboot")
        timings["fab os-update --reboot"] = time.monotonic() - started
        answers.wait_for(200, 3)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert exits == [133] and vps.boots == 2, exits
    assert re.search(r"rebooted \(down \d+ s; maintenance page \d+ s\), verified", result.stdout), result.stdout
    outage = answers.outage()
    timings.update({f"os-update outage: {key}": value for key, value in outage.items()})
    # Nothing but the maintenance page (503) or, while nginx itself was down, no answer; never a 502 or a 500.
    assert set(answers.statuses()) <= {200, 503, None}, answers.statuses()
    assert outage["first failure"] == 503  # the page went up before the reboot took nginx down
    assert running_programs(vps) >= PROGRAMS

    again = fab(vps, "provision")  # a deployed, rebooted server is still exactly as provision leaves it
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout + again.stderr


# --- The README's quick start after deploy, as a new user runs it: env, createsuperuser, the admin ---------------


def fab_argv(vps: Container, *args: str) -> list[str]:
    return [str(FAB), "-H", f"root@{vps.address}", "-i", str(vps.key), *args]


def server_secrets(vps: Container) -> dict[str, str]:
    """The secret values in the server's env file: SECRET_KEY and the password of each URL (PostgreSQL, Redis)."""
    found = {}
    for line in vps.ssh("cat /srv/prayer-room/shared/env").stdout.splitlines():
        key, _, value = line.partition("=")
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):  # a comment (its examples hold placeholder passwords)
            continue
        if key == "SECRET_KEY":
            found[key] = value
        elif "://" in value and urllib.parse.urlsplit(value).password:
            found[f"{key} password"] = urllib.parse.unquote(urllib.parse.urlsplit(value).password)
    return found


def test_the_readme_quick_start_env_createsuperuser_then_the_admin_lists_the_schedules(vps):
    """After `fab provision` and `fab deploy`, the README's last steps: `fab env` (every variable the programs get,
    each with its source, no secret value), `fab manage createsuperuser` on a terminal, then a sign-in to /admin/
    through the nginx site provision rendered, where Periodic tasks lists the seeded schedules."""
    begun = time.monotonic()
    release = vps.ssh(". /etc/os-release && echo $VERSION_ID").stdout.strip()
    transcript = [f"# the README's quick start after provision and deploy, on a fresh Debian {release} server"]

    started = time.monotonic()
    listed = fab(vps, "env")
    timings["quick start: fab env (s)"] = round(time.monotonic() - started, 1)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    transcript += [f"$ fab -H root@{vps.address} env    # {timings['quick start: fab env (s)']} s", listed.stdout]
    secrets = server_secrets(vps)
    assert {"SECRET_KEY", "DATABASE_URL password", "CELERY_BROKER_URL password"} <= set(secrets), list(secrets)
    assert all(len(value) >= 16 for value in secrets.values()), {k: len(v) for k, v in secrets.items()}  # real ones
    shown = [what for what, value in secrets.items() if value in listed.stdout + listed.stderr]
    assert shown == [], f"fab env printed the value of {shown}"
    header, *lines = [line for line in listed.stdout.splitlines() if line.strip()]
    assert header.split() == ["KEY", "VALUE", "SOURCE"], header
    rows = {line.split()[0]: re.split(r"\s{2,}", line.strip()) for line in lines}
    effective = vps.ssh("cat /srv/prayer-room/shared/env.effective").stdout
    keys = {line.split("=", 1)[0] for line in effective.splitlines() if re.match(r"[A-Z_][A-Z0-9_]*=", line)}
    assert keys and keys <= set(rows), sorted(keys - set(rows))  # every variable the programs get is listed
    assert all(len(row) == 3 and row[2] for row in rows.values()), [r for r in rows.values() if len(r) != 3]
    assert rows["SECRET_KEY"] == ["SECRET_KEY", "********", "env file"], rows["SECRET_KEY"]
    assert "********@" in rows["DATABASE_URL"][1], rows["DATABASE_URL"]

    username, password = "staff", "a long pass phrase 7"
    env = {**operator_env(vps.workdir / "operator", vps), "TERM": "xterm"}
    started = time.monotonic()
    prompts = PtySession(fab_argv(vps, "manage", "createsuperuser"), env=env, cwd=str(REPO))
    prompts.expect("Username (leave blank to use")
    prompts.line(username)
    prompts.expect("Email address:")
    prompts.line("staff@example.com")
    prompts.expect("Password:")
    prompts.line(password)
    prompts.expect("Password (again):")
    prompts.line(password)
    prompts.expect("Superuser created successfully.")
    assert prompts.wait() == 0, prompts.seen[-800:]
    timings["quick start: fab manage createsuperuser (s)"] = round(time.monotonic() - started, 1)
    assert password.encode() not in prompts.seen  # the password prompts do not echo
    typed = prompts.seen.decode(errors="replace").replace("\r\n", "\n").strip()
    took = timings["quick start: fab manage createsuperuser (s)"]
    transcript += [f"$ fab -H root@{vps.address} manage createsuperuser    # {took} s, typed at once", typed, ""]

    base = f"http://{vps.address}"  # provision's nginx site, on port 80
    started = time.monotonic()
    browser = signed_in(base, username, password)
    status, home = admin_page(browser, f"{base}/admin/")
    assert status == 200 and "Site administration" in home and "Periodic tasks" in home, home[:2000]
    status, changelist = admin_page(browser, f"{base}/admin/django_celery_beat/periodictask/")
    timings["quick start: admin sign-in and Periodic tasks (s)"] = round(time.monotonic() - started, 1)
    assert status == 200, changelist[:2000]
    listed_names = re.findall(r'<th class="field-name"><a href="[^"]+">([^<]+)</a>', changelist)
    seeded = {schedule.name for schedule in SCHEDULES}  # beside them, beat's own celery.backend_cleanup
    assert seeded <= set(listed_names), listed_names
    refused = sign_in_to_admin(base, username, "not the password")
    assert "Site administration" not in refused[1]  # positive control: a wrong password does not get in
    took = timings["quick start: admin sign-in and Periodic tasks (s)"]
    transcript += [
        f"# {base}/admin/ signed in as {username!r} ({took} s): Periodic tasks lists {', '.join(listed_names)}"
    ]
    timings["quick start: the whole test, checks included (s)"] = round(time.monotonic() - begun, 1)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"quick-start-debian-{release}.txt").write_text("\n".join(transcript) + "\n")
    print("\n".join(transcript))


def test_os_update_names_a_server_that_does_not_come_back_and_leaves_the_page_on(vps):
    with vps.rebooting_on_request(come_back=False) as exits:
        result = fab(vps, "os-update", "--reboot", "--boot-timeout", "5")
        # fab gives up 5 s after SSH went away; the container may still be shutting down (its services stopping on
        # a loaded machine): wait for it to power off before leaving the block that watches for its exit.
        deadline = time.monotonic() + 240  # supervisord's stop timeouts (web's graceful one, the worker's warm one)
        while not exits and time.monotonic() < deadline:
            time.sleep(0.2)
    assert exits == [133], (result.stdout + result.stderr)[-3000:]
    error = (result.stdout + result.stderr).strip().splitlines()[-1]
    assert result.returncode == 1 and error.startswith(f"error: os-update stopped at {vps.address}: "), error
    assert f"root@{vps.address} did not come back within 5 s of its reboot" in error, error
    assert "the maintenance page stays on" in error and "/srv/prayer-room/maintenance-on" in error, error
    vps.boot()
    deadline = time.monotonic() + 60
    while (answer := server_answer(f"http://{vps.address}/health/"))[0] is None:  # until nginx is up
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)
    assert answer[0] == 503, answer  # back, still behind the page until the operator removes it
    vps.ssh("rm /srv/prayer-room/maintenance-on")
    wait_until_serving(vps, timeout=60)
    assert vps.boots == 3
    # Its deploy lock could not be released while it was down: `fab unlock`, as the docs say, before anything else.
    unlocked = fab(vps, "unlock")
    assert unlocked.returncode == 0 and "removed the deploy lock of " in unlocked.stdout, unlocked.stdout
    assert "(os-update)" in unlocked.stdout, unlocked.stdout


def test_the_daily_backup_timer_waits_and_its_first_run_writes_a_backup(vps):
    """After the deploy above: the timer is enabled and scheduled; one run of its service leaves a checked dump."""
    assert vps.ssh("systemctl is-enabled prayer-room-backup.timer && systemctl is-active prayer-room-backup.timer")
    assert "prayer-room-backup.timer" in vps.ssh("systemctl list-timers --all --no-pager").stdout
    vps.ssh("systemctl start prayer-room-backup.service")  # a oneshot: returns when the backup is written
    listing = vps.ssh("stat -c '%U %a' /var/backups/prayer-room; ls /var/backups/prayer-room").stdout.split()
    assert listing[:2] == ["root", "700"], listing
    dumps = [name for name in listing[2:] if name.endswith(".dump")]
    assert len(dumps) == 1 and "-daily-" in dumps[0], listing
    release = vps.ssh("basename $(readlink /srv/prayer-room/current)").stdout.strip()
    assert dumps[0].endswith(f"-daily-{release}.dump")
    assert vps.ssh(f"cd /var/backups/prayer-room && pg_restore --list {dumps[0]} | grep -c 'TABLE DATA'").stdout
    result = fab(vps, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"backups: last {dumps[0]} (daily)" in result.stdout and "WARNING" not in result.stdout
    assert re.search(r"^updates: (none|\d+) pending.*unattended-upgrade ran", result.stdout, re.M), result.stdout
    # `fab os-update` ran apt-get update above: provision's hook left its stamp, and the lists are fresh.
    assert vps.ssh("test -f /var/lib/apt/periodic/update-success-stamp", check=False).returncode == 0
    assert re.search(r"^updates: .*; package lists fetched 0 h ago", result.stdout, re.M), result.stdout
    vps.ssh("touch /var/run/reboot-required && echo libc6 > /var/run/reboot-required.pkgs")  # as libc6's postinst
    try:
        result = fab(vps, "status")
        assert "WARNING: a reboot is pending since 0 h ago by libc6: `fab os-update` reboots it" in result.stdout
    finally:
        vps.ssh("rm -f /var/run/reboot-required /var/run/reboot-required.pkgs")


# --- The watchdog (on the deployed server above, Debian 13 only: the same unit and checks on both releases) -----

WATCHDOG = "prayer-room-watchdog.service"


@pytest.fixture(scope="module")
def receiver(vps):
    """A webhook receiver on the host's end of the container's link, made the server's notify target by provision."""
    with Receiver(host=vps.gateway) as found:
        text = (REPO / "deploy.toml").read_text().replace("[defaults]\n", f'[defaults]\nnotify = ["{found.url}"]\n', 1)
        config = vps.workdir / "notify.toml"
        config.write_text(text)
        result = fab(vps, "provision", "--config", str(config))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 of 12 steps changed the server (watchdog)" in result.stdout, result.stdout
        found.config = config
        watch(vps)  # what is open before any fault (on a busy CI disk, maybe /): those alerts are not ours
        yield found


def watch(vps: Container) -> None:
    """One watchdog run now, as the timer starts it (a oneshot: returns when it has sent what it had); a failed run
    fails with the unit's result and its journal."""
    started = time.monotonic()
    result = vps.ssh(f"systemctl start {WATCHDOG}", check=False)
    if result.returncode != 0:
        shown = vps.ssh(f"systemctl show -p Result -p ExecMainStatus {WATCHDOG}; journalctl -b -n 60 --no-pager -u "
                        f"{WATCHDOG}", check=False)  # fmt: skip
        raise AssertionError(f"the watchdog run failed after {time.monotonic() - started:.1f} s: {result.stderr}\n"
                             f"{shown.stdout}")  # fmt: skip
    took = time.monotonic() - started
    timings["watchdog: slowest run (s)"] = round(max(took, timings.get("watchdog: slowest run (s)", 0)), 1)
    print(f"watchdog run: {took:.1f} s")


@contextmanager
def injected(vps: Container, inject: str, fix: str) -> Iterator[None]:
    """The fault `inject` made, and undone by `fix` whatever happens meanwhile: a failure leaves no fault behind for
    the next test."""
    try:
        vps.ssh(inject)
        yield
    finally:
        undone = vps.ssh(fix, check=False)
    assert undone.returncode == 0, f"{fix}: {undone.stdout}{undone.stderr}"


def watch_until(vps: Container, receiver: Receiver, alert: str, event: str, since: float, timeout: float = 90) -> dict:
    """Runs of the watchdog until `receiver` got `event` about `alert` after `since`; that notice."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        watch(vps)
        found = [body for body in receiver.about(alert, since) if body["event"] == event]
        if found:
            return found[0]
        time.sleep(1)
    raise AssertionError(f"no {event} about {alert} in {timeout} s: {[b['text'] for b in receiver.received]}")


@pytest.mark.parametrize("vps", ["trixie"], indirect=True)
def test_the_watchdog_timer_starts_the_sandboxed_service_every_minute(vps, receiver):
    state = vps.ssh("systemctl is-enabled prayer-room-watchdog.timer; systemctl is-active prayer-room-watchdog.timer")
    assert state.stdout.split() == ["enabled", "active"]
    calendar = vps.ssh("systemctl show -p TimersCalendar --value prayer-room-watchdog.timer").stdout
    assert "OnCalendar=*-*-* *:*:00" in calendar, calendar
    result = vps.ssh(f"systemctl show -p Result -p User -p CapabilityBoundingSet -p StartLimitIntervalUSec {WATCHDOG}")
    assert "Result=success" in result.stdout and "CapabilityBoundingSet=\n" in result.stdout + "\n", result.stdout
    assert "StartLimitIntervalUSec=0\n" in result.stdout + "\n", result.stdout  # never refused a run (watch below)
    assert vps.ssh("stat -c '%U %a' /etc/prayer-room-watchdog /var/lib/prayer-room-watchdog").stdout.split() == [
        "root", "700", "root", "700"
    ]  # fmt: skip


ENV_FILE = "/srv/prayer-room/shared/env.effective"
FAULTS = {
    # name: (the alert it opens, inject, fix); each fix also undoes what a half-done inject did
    "beat stopped": ("beat", "supervisorctl stop prayer-room:beat", "supervisorctl start prayer-room:beat"),
    "PostgreSQL stopped": ("health", "systemctl stop postgresql", "systemctl start postgresql"),
    "a program crashing at start": (
        "program:prayer-room:worker",
        f"cp -p {ENV_FILE} /root/env.saved && echo AXES_FAILURE_LIMIT=broken >> {ENV_FILE}"
        " && (timeout 5 supervisorctl restart prayer-room:worker || true)",
        f"(test ! -f /root/env.saved || mv /root/env.saved {ENV_FILE}) && supervisorctl start prayer-room:worker",
    ),
    "a filled disk": (
        "disk:/mnt/filled",
        "mkdir -p /mnt/filled && mount -t tmpfs -o size=1m tmpfs /mnt/filled"
        " && (dd if=/dev/zero of=/mnt/filled/fill bs=64k count=20 2>/dev/null || true)",
        "! mountpoint -q /mnt/filled || umount /mnt/filled",
    ),
    "a failing backup": (
        "backup",
        "mv /var/backups/prayer-room /var/backups/prayer-room.aside && touch /var/backups/prayer-room"
        " && ! systemctl start prayer-room-backup.service",
        "(test ! -d /var/backups/prayer-room.aside || (rm -f /var/backups/prayer-room && mv"
        " /var/backups/prayer-room.aside /var/backups/prayer-room)) && systemctl start prayer-room-backup.service",
    ),
}


@pytest.mark.parametrize("vps", ["trixie"], indirect=True)
def test_each_fault_gives_one_alert_and_one_resolved_notice(vps, receiver):
    """Each fault in turn: runs of the watchdog until its alert, the fix, runs until its resolution; at the end one
    more run, and each alert was sent once and resolved once, and nothing else was sent."""
    begun, latencies = time.time(), {}
    for name, (alert, inject, fix) in FAULTS.items():
        started = time.time()
        with injected(vps, inject, fix):
            opened = watch_until(vps, receiver, alert, "alert", started)
            latencies[name] = opened["_arrived"] - started
            assert opened["severity"] in ("critical", "warning") and opened["host"] == vps.address, opened
            if name == "a filled disk":
                status = fab(vps, "status")
                assert "disk:/mnt/filled: /mnt/filled: space 100 % used" in status.stdout, status.stdout
            if name == "a failing backup":  # the listing says why in one line, as the watchdog's alert does
                status = fab(vps, "status")
                expected = "the backups directory /var/backups/prayer-room cannot be used (Not a directory)"
                assert expected in status.stdout and "Traceback" not in status.stdout, status.stdout
                assert "/var/backups/prayer-room cannot be read (Not a directory)" in opened["message"], opened
        watch_until(vps, receiver, alert, "resolved", started)
    watch(vps)  # and a run after the last fix: nothing more
    alerts = [body["alert"] for body in receiver.received if body["event"] == "alert" and body["_arrived"] >= begun]
    assert alerts == [alert for alert, _, _ in FAULTS.values()], alerts  # no other alert, none twice
    for alert, _, _ in FAULTS.values():
        assert [body["event"] for body in receiver.about(alert, begun)] == ["alert", "resolved"], alert
    for name, latency in latencies.items():
        timings[f"watchdog: {name}, fault to alert (s)"] = round(latency, 1)
        timings[f"watchdog: {name}, notifications"] = len(receiver.about(FAULTS[name][0], begun))
    assert all(latency < 120 for latency in latencies.values()), latencies


@pytest.mark.parametrize("vps", ["trixie"], indirect=True)
def test_an_unreachable_webhook_loses_no_alert(vps, receiver):
    started, receiver.down = time.time(), True
    try:
        with injected(vps, *FAULTS["a filled disk"][1:]):
            watch(vps)
            status = fab(vps, "status")
            assert "1 notice(s) not sent yet" in status.stdout, status.stdout
    finally:
        receiver.down = False
    watch(vps)  # the alert, then its resolution, in order, once each
    events = [body["event"] for body in receiver.about("disk:/mnt/filled", started)]
    assert events == ["alert", "resolved"], events


# --- Debian 12 -> 13 (on the deployed Debian 12 server above, last: it leaves a Debian 13 server) ---------------


def post_request(vps: Container, content: str) -> tuple[int | None, str]:
    """POST /api/requests/ through the server's nginx, as the site's form does."""
    body = json.dumps({"type": "prayer", "content": content, "location": "chapel"}).encode()
    request = urllib.request.Request(
        f"http://{vps.address}/api/requests/", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return None, str(exc)


def sql(vps: Container, statement: str) -> str:
    """A statement in the site's database as PostgreSQL's superuser on the server; its rows, one a line."""
    url = vps.ssh("sed -n 's/^DATABASE_URL=//p' /srv/prayer-room/shared/env").stdout.strip()
    database = url.rsplit("/", 1)[-1].split("?")[0]
    return vps.ssh(
        f"cd / && runuser -u postgres -- psql -X -q -tA -v ON_ERROR_STOP=1 -d {database} -c {shlex.quote(statement)}"
    ).stdout.strip()


@pytest.mark.timeout(2400)  # a whole release's packages downloaded and installed, then a reboot
@pytest.mark.parametrize("vps", ["bookworm"], indirect=True)
def test_os_update_release_upgrades_debian_12_to_13_with_its_data(vps):
    sql(vps, "INSERT INTO prayer_room_api_location (name, slug, is_active, created_at) VALUES "
             "('Chapel', 'chapel', true, now()) ON CONFLICT DO NOTHING")  # fmt: skip
    assert post_request(vps, "written on Debian 12")[0] == 201
    release = vps.ssh("basename $(readlink /srv/prayer-room/current)").stdout.strip()

    refused = fab(vps, "os-update", "--release")  # no terminal, no --yes: it says what it would do, and stops
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "from Debian 12 (bookworm) to Debian 13 (trixie)" in refused.stdout and "Expected downtime" in refused.stdout
    assert refused.stderr.strip().splitlines()[-1].endswith("run again with --yes."), refused.stderr
    assert "bookworm" in vps.ssh("cat /etc/apt/sources.list.d/debian.sources").stdout  # nothing changed

    with vps.rebooting_on_request() as exits, Answers(f"http://{vps.address}/health/") as answers:
        answers.wait_for(200, 3)
        started = time.monotonic()
        result = fab(vps, "os-update", "--release", "--yes", timeout=3600)
        timings["fab os-update --release: total (s)"] = round(time.monotonic() - started, 1)
        if result.returncode == 0:
            answers.wait_for(200, 3)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "os-update-release-bookworm.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    outage = answers.outage()
    timings.update({f"os-update --release outage: {key}": value for key, value in outage.items()})
    print(f"os-update --release: {timings['fab os-update --release: total (s)']} s in all; outage {outage}")
    assert exits == [133], exits
    # The maintenance page (503), or nothing while nginx or the server was down; never a 502 or a 500.
    assert set(answers.statuses()) <= {200, 503, None}, sorted(set(answers.statuses()), key=str)
    assert outage["first failure"] == 503

    assert vps.ssh(". /etc/os-release && echo $VERSION_CODENAME").stdout.strip() == "trixie"
    clusters = [line.split()[:4] for line in vps.ssh("pg_lsclusters --no-header").stdout.splitlines()]
    assert clusters == [["17", "main", "5432", "online"]], clusters
    assert sql(vps, "SHOW server_version_num").startswith("17")
    assert sql(vps, "SELECT count(*) FROM prayer_room_api_prayerrequest WHERE content = 'written on Debian 12'") == "1"
    venv = vps.ssh("/srv/prayer-room/current/.venv/bin/python -c 'import sys; print(sys.version_info[:2])'").stdout
    assert venv.strip() == "(3, 13)", venv
    assert vps.ssh("basename $(readlink /srv/prayer-room/current)").stdout.strip() == release

    assert http_get(f"http://{vps.address}/health/")[0] == 200
    assert http_get(f"http://{vps.address}/static/admin/css/base.css")[0] == 200
    assert post_request(vps, "written on Debian 13")[0] == 201
    written = "SELECT count(*) FROM prayer_room_api_prayerrequest WHERE content LIKE 'written on Debian 1_'"
    assert sql(vps, written) == "2"
    assert running_programs(vps) >= PROGRAMS

    listed = fab(vps, "history")
    assert re.search(r"os-update --release.*ok", listed.stdout), listed.stdout
    again = fab(vps, "provision")  # the upgraded server is exactly as provision leaves a Debian 13 one
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout + again.stderr
