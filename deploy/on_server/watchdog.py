"""The watchdog: runs ON each server every minute (prayer-room-watchdog.timer), python3's standard library only.

It checks what the host's roles make it responsible for, keeps the open alerts in a root-only state file, and
sends each alert once when it starts, a reminder at most every REMIND_EVERY, and a "resolved" notice when it
clears, to deploy.toml's `notify` targets. A notice that cannot be sent stays in the state's outbox and is tried
again at the next run. Provision installs a root-owned copy (deploy/on_server/senders.py and common.py inlined)
and its config in /etc/prayer-room-watchdog/ (root-only: webhook URLs hold tokens).

Commands: `run` (the timer's), `status` (the open alerts as one JSON line, for `fab status`), `announce` (a notice
fab hands over for the email targets, queued and sent like an alert's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request

from deploy.on_server.common import database_environment, read_env_file
from deploy.on_server.senders import is_email, notice, send

REMIND_EVERY = 6 * 3600
OUTBOX_LIMIT = 500  # notices kept for targets that stay unreachable; the oldest go first
OUTBOX_MAX_AGE = 7 * 86400
STATE_FILE = "state.json"
START_GRACE = 60  # seconds after supervisord started (a boot) before its programs and /health/ are judged
MESSAGE_LIMIT = 500
# A run's time (the unit's TimeoutStartSec is 55 s): the checks get CHECK_BUDGET, each command's timeout cut to what
# is left (a check out of time cannot tell: its alerts stay as they are); no notice is begun after SEND_BUDGET, so a
# send's own timeout (senders.SEND_TIMEOUT) still ends within the unit's.
CHECK_BUDGET = 30
SEND_BUDGET = 40
SHORT_RUNS = 3  # runs in a row that left checks out for lack of time before that is an alert itself
# apt's simulation (seconds of CPU on a small server) is redone when the package lists, the installed packages or
# apt's sources changed, else hourly; its answer is kept in the state between.
UPDATES_EVERY = 3600
APT_INPUTS = ("/var/lib/apt/lists", "/var/lib/dpkg/status", "/etc/apt/sources.list", "/etc/apt/sources.list.d",
              "/etc/apt/preferences.d")  # fmt: skip
# prayer_room_api.beat.LOCK_KEY: the advisory lock the leading beat holds (tests/deploy/test_watchdog.py keeps
# the two equal).
BEAT_LOCK_KEY = (0x50524159, 0x42454154)
DEFAULTS = {
    "backup_max_age_hours": 26,
    "certificate_days": 14,
    "disk_percent": 90,
    "memory_pressure": 20.0,  # % of the last 60 s some task stalled on memory (PSI "some avg60")
    "task_grace_seconds": 300,
    "loop_restarts": 3,  # a program seen restarted at this many runs in a row is restarting in a loop
    "update_days": 7,
}
# What each alert's key starts with: the check that raises it. A check that cannot tell (the database is down for
# the beat check) leaves its alerts as they are: neither opened nor resolved.
SEVERITY = {"program": "critical", "health": "critical", "beat": "critical", "backup": "critical",
            "disk": "critical", "task": "warning", "certificate": "warning", "memory": "warning",
            "reboot": "warning", "updates": "warning", "watchdog": "warning"}  # fmt: skip
REAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "jfs", "reiserfs"}


class Unknown(Exception):
    """A check could not tell (its source did not answer): its open alerts stay as they are."""


# --- the alert state machine (pure: tests/deploy/test_watchdog.py drives it) -----------------------------------


def advance(state: dict, problems: dict[str, str], checked: set[str], now: float) -> list[dict]:
    """Compare `problems` (key -> message) with the open alerts of `state` (changed in place) for the checks that
    ran (`checked`: key prefixes); returns the events to send: alert (new), reminder (open for REMIND_EVERY since
    the last one), resolved (gone)."""
    opened = state.setdefault("open", {})
    events = []
    for key, message in sorted(problems.items()):
        message = message[:MESSAGE_LIMIT]  # parts come from the app (/health/'s answer): bounded
        alert = opened.get(key)
        if alert is None:
            opened[key] = {"message": message, "since": now, "told": now, "severity": severity_of(key)}
            events.append({"event": "alert", "key": key, "message": message, "severity": severity_of(key)})
        else:
            alert["message"] = message
            if now - alert["told"] >= REMIND_EVERY:
                alert["told"] = now
                since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(alert["since"]))
                events.append({"event": "reminder", "key": key, "severity": alert["severity"],
                               "message": f"{message} (open since {since})"})  # fmt: skip
    for key in sorted(opened):
        if key not in problems and key.split(":")[0] in checked:
            alert = opened.pop(key)
            events.append({"event": "resolved", "key": key, "severity": "ok",
                           "message": f"resolved after {ago(now - alert['since'])}: {alert['message']}"})  # fmt: skip
    return events


def severity_of(key: str) -> str:
    return SEVERITY.get(key.split(":")[0], "warning")


def queue(state: dict, targets: list[str], bodies: list[dict], now: float) -> None:
    """Put each notice in the outbox once per target; keep the outbox bounded."""
    outbox = state.setdefault("outbox", [])
    outbox += [{"target": target, "body": body, "queued": now} for body in bodies for target in targets]
    outbox[:] = [item for item in outbox if now - item["queued"] < OUTBOX_MAX_AGE][-OUTBOX_LIMIT:]


def flush(state: dict, deliver, log=print, deadline: float = math.inf) -> tuple[int, int]:
    """Send the outbox in order through `deliver(target, body)`; a target that fails is not tried again this run,
    its notices stay for the next, and so do those not begun by `deadline` (time.monotonic()). Returns (sent, left)."""
    outbox, kept, down, sent = state.get("outbox", []), [], set(), 0
    for item in outbox:
        if item["target"] in down or time.monotonic() >= deadline:
            kept.append(item)
            continue
        try:
            deliver(item["target"], item["body"])
            sent += 1
        except OSError as exc:
            down.add(item["target"])
            kept.append(item)
            log(f"watchdog: not sent ({exc}); tried again at the next run")
    state["outbox"] = kept
    return sent, len(kept)


# --- the checks ---------------------------------------------------------------------------------------------


def left(deadline: float, most: float) -> float:
    """Seconds a step may take: `most`, cut to what is left before `deadline` (time.monotonic())."""
    return min(most, deadline - time.monotonic())


def run_command(argv: list[str], env: dict | None = None, timeout: float = 20,
                deadline: float = math.inf) -> subprocess.CompletedProcess:  # fmt: skip
    """argv's result; subprocess.TimeoutExpired past `timeout` or `deadline`, whichever comes first."""
    seconds = left(deadline, timeout)
    if seconds <= 0:
        raise subprocess.TimeoutExpired(argv, 0)
    return subprocess.run(argv, capture_output=True, text=True, timeout=seconds, env=env, cwd="/")


def check_programs(config: dict, state: dict, now: float, deadline: float = math.inf) -> dict[str, str]:
    """supervisorctl status: a program FATAL or in BACKOFF, or found restarted at `loop_restarts` runs in a row."""
    try:
        result = run_command([config.get("supervisorctl", "supervisorctl"), "status"], deadline=deadline)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unknown(f"supervisorctl: {exc}") from None
    lines = [line.split(None, 2) for line in result.stdout.splitlines() if line.strip()]
    if result.returncode not in (0, 3) or any(len(words) < 2 for words in lines):
        text = (result.stdout + result.stderr).strip().splitlines()
        return {"program:supervisord": f"supervisord does not answer ({text[-1] if text else 'no output'})"}
    problems, seen = {}, state.setdefault("programs", {})
    for words in lines:
        name, status, info = words[0], words[1], (words[2] if len(words) > 2 else "")
        if status in ("FATAL", "BACKOFF"):
            problems[f"program:{name}"] = f"{name} is {status}: {info}".rstrip(": ")
        pid = re.search(r"pid (\d+)", info)
        previous = seen.get(name, {})
        restarts = previous.get("restarts", 0)
        if pid and previous.get("pid") and previous["pid"] != pid.group(1) and now - previous.get("at", 0) < 300:
            restarts += 1
        elif pid:
            restarts = 0
        seen[name] = {"pid": pid.group(1) if pid else None, "at": now, "restarts": restarts}
        if restarts >= config["loop_restarts"] and f"program:{name}" not in problems:
            problems[f"program:{name}"] = f"{name} is restarting in a loop (a new pid at {restarts} runs in a row)"
    return problems


def health_host(env: dict) -> str:
    """A Host header Django accepts: the first plain name of ALLOWED_HOSTS (as deploy.verify does)."""
    names = [h.strip().lstrip(".") for h in env.get("ALLOWED_HOSTS", "").split(",")]
    names = [h for h in names if h and "*" not in h]
    return names[0] if names else "localhost"


def check_health(config: dict, env: dict, pause: float = 3.0, deadline: float = math.inf) -> dict[str, str]:
    """GET /health/ on each web program's loopback port: 200, or an alert naming what failed (asked twice, `pause`
    apart: a program supervisord is restarting answers again within seconds)."""
    failures = health_failures(config, env, deadline)
    if failures:
        if left(deadline, pause + 1) <= pause:
            raise Unknown("no time left to ask /health/ again")
        time.sleep(pause)
        failures = health_failures(config, env, deadline)
    return {"health": "/health/ failed on " + "; ".join(failures)} if failures else {}


def health_failures(config: dict, env: dict, deadline: float = math.inf) -> list[str]:
    failures = []
    for port in config["web_ports"]:
        seconds = left(deadline, 10)
        if seconds <= 0:
            raise Unknown("no time left to ask /health/")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/health/", headers={"Host": health_host(env), "X-Forwarded-Proto": "https"}
        )
        try:
            with urllib.request.urlopen(request, timeout=seconds) as response:
                response.read()
            continue
        except urllib.error.HTTPError as exc:
            try:
                checks = json.loads(exc.read().decode()).get("checks", {})
                bad = ", ".join(f"{name} {state}" for name, state in checks.items() if state != "ok")
            except (ValueError, AttributeError):
                bad = ""
            failures.append(f"port {port}: HTTP {exc.code}" + (f" ({bad})" if bad else ""))
        except OSError as exc:
            failures.append(f"port {port}: {getattr(exc, 'reason', exc)}")
    return failures


def query(env: dict, sql: str, deadline: float = math.inf) -> list[list[str]]:
    """Rows of `sql` (tab-separated fields) through psql with the env file's DATABASE_URL; Unknown when the
    database does not answer."""
    try:
        libpq = database_environment(env)
        result = run_command(["psql", "-X", "-q", "-t", "-A", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             env={**libpq, "PGCONNECT_TIMEOUT": "5"}, deadline=deadline)  # fmt: skip
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise Unknown(f"psql: {exc}") from None
    if result.returncode != 0:
        raise Unknown(f"the database does not answer: {result.stderr.strip()[-300:]}")
    return [line.split("\t") for line in result.stdout.splitlines() if line]


def check_beat(env: dict, pause: float = 6.0, deadline: float = math.inf) -> dict[str, str]:
    """Exactly one beat holds the leader lock (project/prayer_room_api/beat.py); none is asked again after `pause`:
    a standby or a restarted beat takes a free lock within a few seconds (its STANDBY_RETRY is 2 s)."""
    rows = beat_leaders(env, deadline)
    if not rows:
        if left(deadline, pause + 1) <= pause:
            raise Unknown("no time left to ask for the beat leader again")
        time.sleep(pause)
        rows = beat_leaders(env, deadline)
    if not rows:
        return {"beat": "no beat leads: periodic tasks are not dispatched (is beat running? `fab status`)"}
    if len(rows) > 1:
        return {"beat": f"{len(rows)} beats lead ({', '.join(r[0] for r in rows)}): every task is dispatched twice"}
    return {}


def beat_leaders(env: dict, deadline: float = math.inf) -> list[list[str]]:
    return query(
        env,
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = "
        f"'advisory' AND l.granted AND l.classid = {BEAT_LOCK_KEY[0]} AND l.objid = {BEAT_LOCK_KEY[1]} AND "
        "l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        deadline,
    )


TASKS_SQL = """
SELECT t.name, EXTRACT(EPOCH FROM GREATEST(COALESCE(t.last_run_at, '-infinity'), t.date_changed)),
       i.every, i.period, c.minute, c.hour, c.day_of_week, c.day_of_month, c.month_of_year, c.timezone
FROM django_celery_beat_periodictask t
LEFT JOIN django_celery_beat_intervalschedule i ON i.id = t.interval_id
LEFT JOIN django_celery_beat_crontabschedule c ON c.id = t.crontab_id
WHERE t.enabled AND NOT t.one_off AND (t.start_time IS NULL OR t.start_time <= now())
  AND (t.expires IS NULL OR t.expires > now()) AND (t.interval_id IS NOT NULL OR t.crontab_id IS NOT NULL)
"""
PERIODS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1, "microseconds": 1e-6}
_NAMES = {
    "day_of_week": "sun mon tue wed thu fri sat",
    "month_of_year": "jan feb mar apr may jun jul aug sep oct nov dec",
}
_RANGES = {"minute": (0, 59), "hour": (0, 23), "day_of_week": (0, 6), "day_of_month": (1, 31), "month_of_year": (1, 12)}


def cron_field(text: str, field: str) -> set[int]:
    """The values a Celery crontab field (`*`, `*/15`, `1-5`, `mon-fri`, lists of them) allows; ValueError if odd."""
    low, high = _RANGES[field]
    names = {name: number + (field == "month_of_year") for number, name in enumerate(_NAMES.get(field, "").split())}
    values = set()
    for part in text.lower().replace(" ", "").split(","):
        span, _, step = part.partition("/")
        if span == "*":
            first, last = low, high
        else:
            start, _, end = span.partition("-")
            first = int(names.get(start, start))
            last = int(names.get(end, end)) if end else (high if step else first)
        values |= set(range(first, last + 1, int(step) if step else 1))
    if not values or min(values) < low or max(values) > high:
        raise ValueError(f"{field} {text!r} is out of range")
    return values


def last_due(crontab: dict[str, str], before: datetime.datetime) -> datetime.datetime | None:
    """The latest minute at or before `before` (naive, in the crontab's zone) the crontab fires on; None within a
    year."""
    allowed = {field: cron_field(crontab[field], field) for field in _RANGES}
    day = before.replace(second=0, microsecond=0)
    for back in range(367):
        date = (day - datetime.timedelta(days=back)).date()
        if (date.month not in allowed["month_of_year"] or date.day not in allowed["day_of_month"]
                or (date.isoweekday() % 7) not in allowed["day_of_week"]):  # fmt: skip
            continue
        for hour in sorted(allowed["hour"], reverse=True):
            for minute in sorted(allowed["minute"], reverse=True):
                moment = datetime.datetime.combine(date, datetime.time(hour, minute))
                if moment <= before:
                    return moment
    return None


def overdue(row: list[str], now: float, grace: float) -> str | None:
    """Why the periodic task of `row` (TASKS_SQL) is overdue, or None."""
    name, last, every, period, *cron = row
    last_seen = float(last) if last and last != "-Infinity" else 0.0
    if every:
        seconds = int(every) * PERIODS.get(period, 1)
        if now - last_seen > seconds + grace:
            return f"{name} (every {every} {period}) was last dispatched {ago(now - last_seen)} ago"
        return None
    from zoneinfo import ZoneInfo

    minute, hour, day_of_week, day_of_month, month_of_year, zone = cron
    crontab = dict(minute=minute, hour=hour, day_of_week=day_of_week, day_of_month=day_of_month,
                   month_of_year=month_of_year)  # fmt: skip
    tz = ZoneInfo(zone or "UTC")
    local = datetime.datetime.fromtimestamp(now - grace, tz).replace(tzinfo=None)
    due = last_due(crontab, local)
    if due is None or due.replace(tzinfo=tz).timestamp() <= last_seen:
        return None
    spec = " ".join(crontab.values())
    return f"{name} (crontab {spec} {zone}) was due at {due:%Y-%m-%d %H:%M} and not dispatched"


def ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.0f} min"


def check_tasks(config: dict, env: dict, now: float, deadline: float = math.inf) -> dict[str, str]:
    """Each enabled periodic task was dispatched within its period (interval) or since it was last due (crontab),
    plus task_grace_seconds."""
    problems = {}
    for row in query(env, TASKS_SQL, deadline):
        try:
            why = overdue(row, now, config["task_grace_seconds"])
        except (ValueError, KeyError, TypeError):
            continue  # a schedule this check cannot read is not an alert
        if why:
            problems[f"task:{row[0]}"] = why
    return problems


def check_backups(config: dict, now: float, deadline: float = math.inf) -> dict[str, str]:
    """The daily backup's unit did not fail, its directory can be read, and the newest backup is younger than
    backup_max_age_hours."""
    unit = config["backup_unit"]
    try:
        state = run_command(["systemctl", "show", "--property=ActiveState,Result", "--value", unit],
                            deadline=deadline).stdout.split()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unknown(f"systemctl: {exc}") from None
    problems = []
    if "failed" in state:
        problems.append(f"the last run of {unit} failed (`journalctl -u {unit}` on the server)")
    newest = 0.0
    try:
        for name in os.listdir(config["backup_dir"]):
            if name.endswith(".dump.json"):
                try:
                    with open(os.path.join(config["backup_dir"], name)) as handle:
                        newest = max(newest, float(json.load(handle).get("created", 0)))
                except (OSError, ValueError, TypeError, AttributeError):
                    continue
    except FileNotFoundError:
        pass  # no backup yet: judged by the release's age below
    except OSError as exc:  # e.g. a file where the directory should be
        problems.append(f"the backups directory {config['backup_dir']} cannot be read ({exc.strerror or exc})")
    limit = config["backup_max_age_hours"] * 3600
    live_since = lstat_mtime(config["current"])
    if newest and now - newest > limit:
        problems.append(f"the newest backup is {ago(now - newest)} old (more than {config['backup_max_age_hours']} h)")
    elif not newest and live_since and now - live_since > limit:
        problems.append(f"no backup in {config['backup_dir']}, and a release has been live for {ago(now - live_since)}")
    return {"backup": "; ".join(problems)} if problems else {}


def lstat_mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def check_certificate(config: dict, now: float, deadline: float = math.inf) -> dict[str, str]:
    """The certificate expires in more than certificate_days, and certbot's last renewal did not fail."""
    import ssl

    problems = []
    try:
        # NOTE: the ssl module's own PEM reader (no openssl process, no private key read).
        not_after = ssl.cert_time_to_seconds(ssl._ssl._test_decode_cert(config["certificate"])["notAfter"])
        days = (not_after - now) / 86400
        if days < config["certificate_days"]:
            problems.append(f"the certificate for {config['domain']} expires in {days:.1f} days")
    except (OSError, ValueError, KeyError) as exc:
        problems.append(f"the certificate {config['certificate']} cannot be read ({exc})")
    try:
        renewal = run_command(["systemctl", "show", "--property=ActiveState", "--value", "certbot.service"],
                              deadline=deadline).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        renewal = ""  # no systemd to ask: the expiry above still counts
    if renewal.strip() == "failed":
        problems.append("the last renewal failed (`journalctl -u certbot` on the server)")
    return {"certificate": "; ".join(problems)} if problems else {}


def check_disks(config: dict) -> dict[str, str]:
    """Each mounted file system (tmpfs included, pseudo ones not) below disk_percent of its space and inodes."""
    problems, seen = {}, set()
    with open("/proc/self/mounts") as mounts:
        entries = [line.split() for line in mounts]
    for _device, mount, kind, *_ in entries:
        mount = mount.replace("\\040", " ")
        # NOTE: not skipped when read-only: ProtectSystem=strict shows the service every mount read-only.
        if kind not in REAL_FILESYSTEMS or mount.startswith(("/proc", "/sys", "/run/credentials")):
            continue
        try:
            stat = os.statvfs(mount)
            device = os.stat(mount).st_dev
        except OSError:
            continue
        if device in seen or not stat.f_blocks:
            continue
        seen.add(device)
        used = []
        space = 100 * (stat.f_blocks - stat.f_bfree) / stat.f_blocks
        if space >= config["disk_percent"]:
            used.append(f"space {space:.0f} % used")
        if stat.f_files:
            inodes = 100 * (stat.f_files - stat.f_ffree) / stat.f_files
            if inodes >= config["disk_percent"]:
                used.append(f"inodes {inodes:.0f} % used")
        if used:
            problems[f"disk:{mount}"] = f"{mount}: {', '.join(used)} (the limit is {config['disk_percent']} %)"
    return problems


def check_memory(config: dict) -> dict[str, str]:
    """Memory pressure: the share of the last minute some task waited for memory (PSI), when the kernel has it."""
    try:
        with open("/proc/pressure/memory") as handle:
            some = dict(part.split("=") for part in handle.readline().split()[1:])
    except (OSError, ValueError):
        raise Unknown("no /proc/pressure/memory") from None
    avg60 = float(some.get("avg60", 0))
    if avg60 >= config["memory_pressure"]:
        return {"memory": f"memory pressure: tasks stalled waiting for memory {avg60:.0f} % of the last minute"}
    return {}


def check_reboot() -> dict[str, str]:
    """/run/reboot-required (Debian's packages leave it after a kernel or libc update)."""
    if not os.path.exists("/run/reboot-required"):
        return {}
    try:
        with open("/run/reboot-required.pkgs") as handle:
            packages = sorted(set(handle.read().split()))
    except OSError:
        packages = []
    named = f" (for {', '.join(packages[:5])})" if packages else ""
    return {"reboot": f"a reboot is required{named}"}


_INST = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) ([^)]*)\)", re.MULTILINE)


def security_updates(simulation: str) -> list[str]:
    """The packages `apt-get -s dist-upgrade` would upgrade from a security suite."""
    return sorted({name for name, _version, origin in _INST.findall(simulation) if "security" in origin.lower()})


def apt_inputs() -> list[int | None]:
    """What apt's simulation depends on, as modification times: the package lists (apt-daily.timer's update), the
    installed packages (dpkg's status), apt's sources."""
    stamps = []
    for path in APT_INPUTS:
        try:
            stamps.append(os.stat(path).st_mtime_ns)
        except OSError:
            stamps.append(None)
    return stamps


def pending_security_updates(state: dict, now: float, deadline: float = math.inf) -> list[str]:
    """The security updates apt's simulation lists: kept in the state's "apt", simulated again only when
    apt_inputs() changed or UPDATES_EVERY has passed."""
    inputs, cached = apt_inputs(), state.get("apt") or {}
    if cached.get("inputs") == inputs and 0 <= now - cached.get("at", -math.inf) < UPDATES_EVERY:
        return cached["pending"]
    try:
        result = run_command(["apt-get", "-s", "-q", "-o", "Debug::NoLocking=1", "-o", "Dir::Cache::pkgcache=",
                              "-o", "Dir::Cache::srcpkgcache=", "dist-upgrade"], timeout=40,
                             deadline=deadline)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unknown(f"apt-get: {exc}") from None
    if result.returncode != 0:
        raise Unknown(f"apt-get -s failed: {result.stderr.strip()[-200:]}")
    pending = security_updates(result.stdout)
    state["apt"] = {"inputs": inputs, "at": now, "pending": pending}
    return pending


def check_updates(config: dict, state: dict, now: float, deadline: float = math.inf) -> dict[str, str]:
    """Security updates waiting longer than update_days (each package's first sighting kept in the state); apt's
    simulation only, from the package lists apt-daily.timer refreshes."""
    pending = pending_security_updates(state, now, deadline)
    seen = state.get("security_updates", {})
    seen = state["security_updates"] = {name: seen.get(name, now) for name in pending}
    old = sorted(name for name, since in seen.items() if now - since > config["update_days"] * 86400)
    if not old:
        return {}
    listed = ", ".join(old[:5]) + (f" and {len(old) - 5} more" if len(old) > 5 else "")
    return {"updates": f"{len(old)} security update(s) waiting for more than {config['update_days']} days: {listed}"}


def deploy_running(config: dict, now: float) -> bool:
    """Whether a deploy, rollback, restore or restart holds the lock now (its heartbeat is fresh): the programs and
    /health/ may be down on purpose meanwhile."""
    newest = 0.0
    try:
        for entry in os.scandir(config["lock"]):
            newest = max(newest, entry.stat().st_mtime)
        newest = max(newest, os.stat(config["lock"]).st_mtime)
    except OSError:
        return False
    return now - newest < config["lock_expiry_seconds"]


def starting(config: dict, deadline: float = math.inf) -> bool:
    """Whether the app's supervisord (config's app_unit) became active less than START_GRACE seconds ago (a boot,
    a provision's restart): its programs are still coming up."""
    if not config.get("app_unit"):
        return False
    try:
        since = run_command(["systemctl", "show", "-p", "ActiveEnterTimestampMonotonic", "--value",
                             config["app_unit"]], deadline=deadline).stdout.strip()  # fmt: skip
        return time.monotonic() - int(since) / 1e6 < START_GRACE
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return False


def inspect(config: dict, state: dict, now: float, log=print,
            deadline: float = math.inf) -> tuple[dict[str, str], set[str]]:  # fmt: skip
    """Run the host's checks within `deadline` (time.monotonic()): (problems, the key prefixes of the checks that
    could tell). A check that raises is logged with its traceback and is itself an alert ("watchdog:NAME"); checks
    left out for lack of time at SHORT_RUNS runs in a row are one too ("watchdog:time")."""
    roles = set(config["roles"])
    env = app_environment(config, log)
    busy = (deploy_running(config, now) if config.get("lock") else False) or starting(config, deadline)
    live = bool(release_of(config))  # before the first deploy there is nothing to run, answer or dispatch
    checks = [("disk", lambda: check_disks(config)), ("memory", lambda: check_memory(config)),
              ("reboot", check_reboot)]  # fmt: skip
    if roles & {"web", "worker", "beat"} and live and not busy:
        checks.append(("program", lambda: check_programs(config, state, now, deadline)))
    if "web" in roles and live and not busy:
        checks.append(("health", lambda: check_health(config, env, deadline=deadline)))
    if config.get("primary") and live:
        if not busy:
            checks.append(("beat", lambda: check_beat(env, deadline=deadline)))
        checks += [("task", lambda: check_tasks(config, env, now, deadline)),
                   ("backup", lambda: check_backups(config, now, deadline))]  # fmt: skip
    if config.get("certificate"):
        checks.append(("certificate", lambda: check_certificate(config, now, deadline)))
    # last: the one that may run apt's simulation (cached, see UPDATES_EVERY)
    checks.append(("updates", lambda: check_updates(config, state, now, deadline)))
    problems, checked, skipped, opened = {}, {"watchdog"}, [], state.get("open", {})
    for name, check in checks:
        if time.monotonic() >= deadline:
            skipped.append(name)
            continue
        try:
            problems.update(check())
            checked.add(name)
            continue
        except Unknown as exc:
            log(f"watchdog: {name}: cannot tell ({exc})")
        except Exception as exc:  # noqa: BLE001 - one broken check must not stop the others or the sending
            traceback.print_exc()
            problems[f"watchdog:{name}"] = (f"the {name} check failed ({type(exc).__name__}: {exc}); "
                                            "`journalctl -u prayer-room-watchdog` on the server")  # fmt: skip
            continue
        if f"watchdog:{name}" in opened:  # it could not tell: whether it still fails is not known either
            problems[f"watchdog:{name}"] = opened[f"watchdog:{name}"]["message"]
    state["short_runs"] = state.get("short_runs", 0) + 1 if skipped else 0
    if skipped:
        log(f"watchdog: out of time (CHECK_BUDGET {CHECK_BUDGET} s): {', '.join(skipped)} not checked this run")
    if state["short_runs"] >= SHORT_RUNS or (skipped and "watchdog:time" in opened):
        problems["watchdog:time"] = (f"the watchdog runs out of time: {', '.join(skipped)} not checked at "
                                     f"{state['short_runs']} runs in a row")  # fmt: skip
    for name in skipped:
        if f"watchdog:{name}" in opened:
            problems[f"watchdog:{name}"] = opened[f"watchdog:{name}"]["message"]
    return problems, checked


# --- the commands ---------------------------------------------------------------------------------------------


def load_config(path: str) -> dict:
    with open(path) as handle:
        return {**DEFAULTS, **json.load(handle)}


def load_state(directory: str) -> dict:
    try:
        with open(os.path.join(directory, STATE_FILE)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def save_state(directory: str, state: dict) -> None:
    """Written whole, then renamed over the old one: a killed run leaves the previous state."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".new", path)


def release_of(config: dict) -> str:
    try:
        return os.path.basename(os.readlink(config["current"])) if config.get("current") else ""
    except OSError:
        return ""


def app_environment(config: dict, log=print) -> dict[str, str]:
    """The programs' environment: the env file, then the deploy's whole one (env.effective) over it."""
    env = {}
    for path in config.get("env_files", []):
        try:
            with open(path) as handle:
                env.update(read_env_file(handle.read()))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log(f"watchdog: {path}: {exc}")
    return env


def delivery(config: dict):
    """deliver(target, body): the webhook POST, or the mail through the programs' EMAIL_URL."""
    env = app_environment(config)
    return lambda target, body: send(target, body, env)


def command_run(args) -> int:
    started = time.monotonic()
    config, now = load_config(args.config), time.time()
    state = load_state(args.state)
    try:
        problems, checked = inspect(config, state, now, deadline=started + CHECK_BUDGET)
    except Exception as exc:  # noqa: BLE001 - the run still sends what it has, and says that it failed
        traceback.print_exc()
        problems = {"watchdog:run": f"the watchdog's checks failed ({type(exc).__name__}: {exc}); "
                                    "`journalctl -u prayer-room-watchdog` on the server"}  # fmt: skip
        checked = {"watchdog"}  # the other alerts stay as they are
    events = advance(state, problems, checked, now)
    release = release_of(config)
    bodies = [notice(e["event"], config["host"], e["severity"], e["message"], release, at=now, alert=e["key"],
                     site=config.get("site", "")) for e in events]  # fmt: skip
    queue(state, config.get("notify", []), bodies, now)
    state["checked_at"] = now
    save_state(args.state, state)  # before sending: a run killed mid-send loses nothing
    sent, waiting = flush(state, delivery(config), deadline=started + SEND_BUDGET)
    save_state(args.state, state)
    for event in events:
        print(f"watchdog: {event['event']} {event['key']}: {event['message']}")
    opened = len(state.get("open", {}))
    print(
        f"watchdog: {len(checked) - 1} checks in {time.monotonic() - started:.1f} s, {opened} open alert(s), "
        f"{sent} notice(s) sent, {waiting} waiting"
    )
    return 0


def command_status(args) -> int:
    state = load_state(args.state)
    print(json.dumps({"open": state.get("open", {}), "outbox": len(state.get("outbox", [])),
                      "checked_at": state.get("checked_at")}))  # fmt: skip
    return 0


def command_announce(args) -> int:
    """A notice from fab (--notice JSON) for the email targets: queued in the outbox, sent now if it can be."""
    config, state = load_config(args.config), load_state(args.state)
    body = json.loads(args.notice)
    queue(state, [t for t in config.get("notify", []) if is_email(t)], [body], time.time())
    save_state(args.state, state)
    sent, left = flush(state, delivery(config))
    save_state(args.state, state)
    print(json.dumps({"sent": sent, "waiting": left}))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="watchdog")
    parser.add_argument("--config", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("command", choices=("run", "status", "announce"))
    parser.add_argument("--notice", default="{}", help="announce: the notice, as JSON")
    args = parser.parse_args(argv)
    return {"run": command_run, "status": command_status, "announce": command_announce}[args.command](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
