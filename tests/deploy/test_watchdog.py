"""The watchdog's alert state machine (start, remind, resolve; retried sends), its schedule arithmetic, its units and
config, notify's validation, and the senders against a real HTTP receiver."""

import datetime
import json
import shutil
import subprocess
import sys

import pytest

from deploy import notify
from deploy.config import DeployConfig, load_config, single_host_site
from deploy.errors import DeployError
from deploy.on_server import script
from deploy.on_server import watchdog as wd
from deploy.on_server.senders import notice, post_webhook, send_email
from deploy.render.systemd import render_watchdog_config, render_watchdog_units
from tests.support.webhook import Receiver

HOUR = 3600.0


def run_once(state, problems, checked, now):
    events = wd.advance(state, problems, checked, now)
    return [(e["event"], e["key"]) for e in events]


def test_an_alert_is_sent_once_when_it_starts_reminded_every_six_hours_and_resolved_once():
    state, checked = {}, {"disk", "beat"}
    assert run_once(state, {"beat": "no beat leads"}, checked, 0) == [("alert", "beat")]
    for minute in range(1, 6 * 60):  # every minute for six hours: nothing new
        assert run_once(state, {"beat": "no beat leads"}, checked, minute * 60) == []
    assert run_once(state, {"beat": "no beat leads"}, checked, 6 * HOUR) == [("reminder", "beat")]
    assert run_once(state, {"beat": "no beat leads"}, checked, 6 * HOUR + 60) == []
    assert run_once(state, {}, checked, 7 * HOUR) == [("resolved", "beat")]
    assert run_once(state, {}, checked, 7 * HOUR + 60) == []
    assert state["open"] == {}


def test_a_check_that_cannot_tell_neither_opens_nor_resolves_its_alerts():
    state = {}
    run_once(state, {"beat": "no beat leads", "disk:/": "/: space 95 %"}, {"beat", "disk"}, 0)
    # the database is down: the beat check could not run; the disk one could, and found it fine
    assert run_once(state, {}, {"disk"}, 60) == [("resolved", "disk:/")]
    assert list(state["open"]) == ["beat"]
    assert run_once(state, {}, {"beat", "disk"}, 120) == [("resolved", "beat")]


def test_each_alert_key_is_its_own_alert_and_a_changed_message_is_not_a_new_one():
    state = {}
    checked = {"disk", "program"}
    events = wd.advance(state, {"disk:/": "95 %", "program:prayer-room:worker": "FATAL"}, checked, 0)
    assert sorted(e["key"] for e in events) == ["disk:/", "program:prayer-room:worker"]
    assert {e["severity"] for e in events} == {"critical"}
    assert wd.advance(state, {"disk:/": "96 %", "program:prayer-room:worker": "FATAL"}, checked, 60) == []
    assert state["open"]["disk:/"]["message"] == "96 %"


def test_a_message_is_bounded():
    events = wd.advance({}, {"health": "x" * 5000}, {"health"}, 0)
    assert len(events[0]["message"]) == wd.MESSAGE_LIMIT


def test_an_unreachable_target_keeps_its_notices_for_the_next_run_and_the_others_get_theirs_once():
    state, delivered, failing = {}, [], {"https://down.example/x"}

    def deliver(target, body):
        if target in failing:
            raise OSError("the webhook is unreachable (connection refused)")
        delivered.append((target, body["event"], body["alert"]))

    for now, problems in ((0, {"beat": "no beat leads"}), (60, {}), (120, {})):
        events = wd.advance(state, problems, {"beat"}, now)
        bodies = [notice(e["event"], "h", e["severity"], e["message"], alert=e["key"]) for e in events]
        wd.queue(state, ["https://up.example/x", "https://down.example/x"], bodies, now)
        sent, left = wd.flush(state, deliver, log=lambda line: None)
        if now == 0:
            assert (sent, left) == (1, 1)
    assert delivered == [("https://up.example/x", "alert", "beat"), ("https://up.example/x", "resolved", "beat")]
    assert [item["body"]["event"] for item in state["outbox"]] == ["alert", "resolved"]  # kept, in order
    failing.clear()  # the webhook is back: both go out, in order, once
    assert wd.flush(state, deliver) == (2, 0)
    assert delivered[2:] == [
        ("https://down.example/x", "alert", "beat"),
        ("https://down.example/x", "resolved", "beat"),
    ]
    assert wd.flush(state, deliver) == (0, 0)


def test_the_outbox_is_bounded():
    state = {}
    wd.queue(state, ["a@example.org"], [{"n": n} for n in range(wd.OUTBOX_LIMIT + 10)], 0)
    assert len(state["outbox"]) == wd.OUTBOX_LIMIT and state["outbox"][-1]["body"] == {"n": wd.OUTBOX_LIMIT + 9}
    wd.queue(state, ["a@example.org"], [{"n": "new"}], wd.OUTBOX_MAX_AGE + 1)
    assert [item["body"] for item in state["outbox"]] == [{"n": "new"}]


@pytest.mark.parametrize(
    ("text", "field", "values"),
    [
        ("*", "minute", set(range(60))),
        ("*/15", "minute", {0, 15, 30, 45}),
        ("1-5", "day_of_week", {1, 2, 3, 4, 5}),
        ("mon-fri", "day_of_week", {1, 2, 3, 4, 5}),
        ("0,30", "minute", {0, 30}),
        ("jan,dec", "month_of_year", {1, 12}),
        ("8", "hour", {8}),
    ],
)
def test_crontab_fields(text, field, values):
    assert wd.cron_field(text, field) == values


def test_a_crontab_field_out_of_range_is_refused():
    with pytest.raises(ValueError):
        wd.cron_field("61", "minute")


def test_the_last_time_a_crontab_was_due():
    crontab = {"minute": "0", "hour": "8", "day_of_week": "1", "day_of_month": "*", "month_of_year": "*"}
    # 2026-12-05 is a Saturday: the weekly Monday 08:00 was due on 2026-11-30
    assert wd.last_due(crontab, datetime.datetime(2026, 12, 5, 9, 30)) == datetime.datetime(2026, 11, 30, 8, 0)
    every_minute = {**crontab, "minute": "*", "hour": "*", "day_of_week": "*"}
    assert wd.last_due(every_minute, datetime.datetime(2026, 12, 5, 9, 30, 42)) == datetime.datetime(2026, 12, 5, 9, 30)


def test_a_periodic_task_is_overdue_after_its_period_and_the_grace():
    now = datetime.datetime(2026, 12, 5, 9, 30, tzinfo=datetime.UTC).timestamp()
    minutely = ["send-outbox", "", "", "", "*", "*", "*", "*", "*", "UTC"]
    assert wd.overdue([*minutely[:1], str(now - 60), *minutely[2:]], now, 300) is None
    why = wd.overdue([*minutely[:1], str(now - 400), *minutely[2:]], now, 300)
    assert why and "send-outbox" in why and "not dispatched" in why
    interval = ["tick", str(now - 800), "10", "minutes", "", "", "", "", "", ""]
    assert wd.overdue(interval, now, 300) is None
    assert "last dispatched" in wd.overdue(["tick", str(now - 1000), "5", "minutes", *[""] * 6], now, 300)
    hourly = ["hourly", str(now - 1800), "", "", "0", "*", "*", "*", "*", "Europe/Berlin"]
    assert wd.overdue(hourly, now, 300) is None  # due at 09:00 UTC (10:00 Berlin), dispatched at 09:00


def test_the_watchdog_looks_for_the_lock_the_beat_leader_holds():
    from prayer_room_api.beat import LOCK_KEY

    assert wd.BEAT_LOCK_KEY == LOCK_KEY


def test_the_timer_runs_the_sandboxed_service_every_minute():
    config = single_host_site(DeployConfig(notify=("https://hooks.example.org/x",)), "root@10.0.0.2")
    service, timer = render_watchdog_units(config)
    assert "OnCalendar=minutely" in timer and "WantedBy=timers.target" in timer
    assert "Type=oneshot" in service and "\nCapabilityBoundingSet=\n" in service
    assert "ProtectSystem=strict" in service and "StateDirectory=prayer-room-watchdog" in service
    assert "/etc/prayer-room-watchdog/watchdog.py --config /etc/prayer-room-watchdog/watchdog.json" in service
    values = json.loads(render_watchdog_config(config))
    assert values["primary"] and values["roles"] == ["beat", "db", "web", "worker"]
    assert values["notify"] == ["https://hooks.example.org/x"] and values["host"] == "10.0.0.2"


def test_the_watchdog_script_runs_alone_and_alerts_then_resolves_over_a_webhook(tmp_path):
    """The installed script's way: python3 -I, no kit on sys.path; a disk limit of 0 % opens an alert for every
    file system, 100 % resolves them; an unreachable webhook keeps the notices for the next run."""
    with Receiver() as receiver:
        config = {"host": "h1", "roles": ["db"], "notify": [receiver.url], "disk_percent": 0}
        receiver.down = True
        assert "waiting" in run_watchdog(tmp_path, config)
        assert receiver.received == []
        receiver.down = False
        run_watchdog(tmp_path, config)
        alerts = [body for body in receiver.received if body["event"] == "alert"]
        assert alerts and all(body["alert"].startswith("disk:") for body in alerts)
        assert len({body["alert"] for body in alerts}) == len(alerts)  # each once, although two runs saw it
        assert {"event", "host", "severity", "message", "release", "time", "text"} <= set(alerts[0])
        assert alerts[0]["text"].startswith("[CRITICAL] alert on h1: ")
        status = json.loads(run_watchdog(tmp_path, config, "status"))
        assert set(status["open"]) == {body["alert"] for body in alerts} and status["outbox"] == 0
        run_watchdog(tmp_path, {**config, "disk_percent": 100})
        resolved = [body["alert"] for body in receiver.received if body["event"] == "resolved"]
        assert sorted(resolved) == sorted(body["alert"] for body in alerts)
        assert json.loads(run_watchdog(tmp_path, config, "status"))["open"] == {}


def write(tmp_path, text):
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return path


def test_notify_takes_webhook_urls_and_email_addresses(tmp_path):
    config = load_config(write(tmp_path, '[defaults]\nnotify = ["https://hooks.example.org/T/B/x", "ops@example.org"]'))
    assert config.notify == ("https://hooks.example.org/T/B/x", "ops@example.org")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"ops@example.org"', "notify must be a list"),
        ('["ftp://example.org/x"]', "neither a webhook URL"),
        ('["https://exa mple.org/x"]', "not http(s)://HOST"),
        ('["ops@localhost"]', "neither a webhook URL"),
        ('["ops@example.org", "ops@example.org"]', "names a target twice"),
    ],
)
def test_a_bad_notify_target_is_one_line_naming_it(tmp_path, value, expected):
    with pytest.raises(DeployError) as refused:
        load_config(write(tmp_path, f"[defaults]\nnotify = {value}\n"))
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_a_refused_webhook_url_is_shown_without_its_token(tmp_path):
    with pytest.raises(DeployError) as refused:
        load_config(write(tmp_path, '[defaults]\nnotify = ["https://hooks.example.org/T0/sec ret"]\n'))
    assert "sec ret" not in str(refused.value) and "hooks.example.org" in str(refused.value)


def test_an_announcement_reaches_a_webhook_and_an_unreachable_one_is_one_warning(capsys):
    with Receiver() as receiver:
        config = single_host_site(DeployConfig(notify=(receiver.url, "http://127.0.0.1:9/x")), "root@10.0.0.2")
        body = notify.announcement(config, "deploy", False, "verify failed on web-1", release="20261205-abc")
        assert notify.announce(config, body) == 1
    assert [(b["event"], b["result"], b["severity"], b["host"]) for b in receiver.received] == [
        ("deploy", "failed", "error", "10.0.0.2")
    ]
    assert "deploy FAILED: verify failed on web-1" in receiver.received[0]["text"]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: deploy not announced to http://127.0.0.1:9/...")


def test_a_webhook_error_does_not_show_the_url():
    with pytest.raises(OSError) as failed:
        post_webhook("http://127.0.0.1:9/hooks/secret-token", {"text": "x"}, timeout=2)
    assert "secret-token" not in str(failed.value)


def test_mail_needs_an_smtp_email_url():
    with pytest.raises(OSError, match="sends no mail"):
        send_email("consolemail://", "from@example.org", "ops@example.org", notice("deploy", "h", "info", "m"))


def test_the_watchdog_unit_is_sandboxed(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (the systemd package; .ci/setup.d/25-provision.sh)")
    path = tmp_path / "prayer-room-watchdog.service"
    path.write_text(render_watchdog_units(single_host_site(DeployConfig(), "root@10.0.0.2"))[0])
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=50", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    exposure = float(result.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])
    assert exposure <= 2.5


APT_SIMULATION = """NOTE: This is only a simulation!
Inst libssl3t64 [3.5.1-1] (3.5.4-1~deb13u1 Debian-Security:13/stable-security [amd64])
Inst openssl [3.5.1-1] (3.5.4-1~deb13u1 Debian-Security:13/stable-security [amd64]) []
Inst tzdata [2025b-4] (2025b-4+deb13u1 Debian:13.2/stable [all])
Conf libssl3t64 (3.5.4-1~deb13u1 Debian-Security:13/stable-security [amd64])
"""


def test_security_updates_alert_once_they_have_waited_seven_days(monkeypatch):
    assert wd.security_updates(APT_SIMULATION) == ["libssl3t64", "openssl"]
    config, state = dict(wd.DEFAULTS), {}
    simulated = subprocess.CompletedProcess([], 0, APT_SIMULATION, "")
    monkeypatch.setattr(wd, "run_command", lambda *args, **kwargs: simulated)  # apt's answer, not this machine's
    assert wd.check_updates(config, state, 0) == {}
    assert wd.check_updates(config, state, 6 * 86400) == {}
    found = wd.check_updates(config, state, 8 * 86400)
    assert found == {"updates": "2 security update(s) waiting for more than 7 days: libssl3t64, openssl"}
    simulated.stdout = ""  # installed: the alert clears
    assert wd.check_updates(config, state, 9 * 86400) == {} and state["security_updates"] == {}


def test_apts_simulation_is_kept_until_the_package_lists_change_or_an_hour_passed(monkeypatch):
    simulations = []

    def simulate(*args, **kwargs):
        simulations.append(args[0])
        return subprocess.CompletedProcess([], 0, APT_SIMULATION, "")

    inputs = [1, 2, 3, None, None]
    monkeypatch.setattr(wd, "run_command", simulate)
    monkeypatch.setattr(wd, "apt_inputs", lambda: list(inputs))
    config, state = dict(wd.DEFAULTS), {}
    for now in (0, 60, 3500):
        wd.check_updates(config, state, now)
    assert len(simulations) == 1 and state["security_updates"] == {"libssl3t64": 0, "openssl": 0}
    wd.check_updates(config, state, 3600)  # an hour on
    inputs[0] = 4  # apt-daily's update replaced the package lists
    wd.check_updates(config, state, 3660)
    wd.check_updates(config, state, 3720)
    assert len(simulations) == 3


def test_a_check_that_raises_is_an_alert_with_its_traceback_in_the_journal_and_the_run_still_sends(tmp_path):
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "r1")  # a live release
    with Receiver() as receiver:
        # no backup_unit: check_backups raises KeyError, a bug of the kind a run must survive and report
        config = {"host": "h", "roles": ["db"], "primary": True, "current": str(tmp_path / "current"),
                  "notify": [receiver.url], "disk_percent": 101}  # fmt: skip
        out = run_watchdog(tmp_path, config)
        assert [(b["event"], b["alert"]) for b in receiver.received] == [("alert", "watchdog:backup")], out
        assert "KeyError: 'backup_unit'" in receiver.received[0]["message"]
        config["backup_unit"], config["backup_dir"] = "prayer-room-backup.service", str(tmp_path)
        run_watchdog(tmp_path, config)  # fixed (systemctl is not on PATH: it cannot tell, so nothing resolves)
        assert len(receiver.received) == 1


def test_a_check_out_of_time_cannot_tell_and_the_checks_after_it_wait_for_the_next_run(tmp_path):
    """A supervisorctl that hangs: the run's deadline cuts it (not its own 20 s timeout); the checks after it are
    left out, their alerts as they were; three such runs in a row are an alert."""
    import time

    (tmp_path / "current").symlink_to(tmp_path / "releases" / "r1")
    hung = tmp_path / "supervisorctl"
    hung.write_text("#!/bin/sh\nexec sleep 30\n")
    hung.chmod(0o755)
    config = {**wd.DEFAULTS, "host": "h", "roles": ["worker"], "current": str(tmp_path / "current"),
              "supervisorctl": str(hung), "disk_percent": 101}  # fmt: skip
    state = {"open": {"program:prayer-room:worker": {"message": "FATAL", "since": 0, "told": 0}}}
    for _ in range(3):
        started = time.monotonic()
        problems, checked = wd.inspect(config, state, 1000, log=lambda line: None, deadline=started + 0.3)
        assert time.monotonic() - started < 5 and "program" not in checked and "updates" not in checked
        events = wd.advance(state, problems, checked, 1000)
        assert "program:prayer-room:worker" in state["open"]
    assert [e["key"] for e in events] == ["watchdog:time"], events
    assert events[0]["message"] == "the watchdog runs out of time: updates not checked at 3 runs in a row"


def test_history_records_of_the_announced_actions_are_announced_a_provision_is_not(capsys):
    with Receiver() as receiver:
        config = single_host_site(DeployConfig(notify=(receiver.url,)), "root@10.0.0.2")
        record = {"event": "provision", "result": "ok", "host": "10.0.0.2", "seconds": 3.0, "who": "ops@laptop"}
        notify.announce_record(config, record, "-")
        notify.announce_record(config, {**record, "event": "maintenance on", "seconds": 1.4}, "upgrading the db")
        failed = {**record, "event": "rollback", "result": "failed", "message": "no verified release", "release": None}
        notify.announce_record(config, failed, "-")
        stopped = {**failed, "event": "os-update", "message": "os-update stopped at 10.0.0.2: did not come back"}
        notify.announce_record(config, stopped, "-")
    assert [(b["event"], b["result"], b["by"]) for b in receiver.received] == [
        ("maintenance on", "ok", "ops@laptop"),
        ("rollback", "failed", "ops@laptop"),
        ("os-update", "failed", "ops@laptop"),
    ]
    assert receiver.received[2]["message"] == "os-update FAILED: os-update stopped at 10.0.0.2: did not come back"
    assert receiver.received[0]["message"] == "maintenance on succeeded: upgrading the db (1.4 s)"
    assert receiver.received[1]["message"] == "rollback FAILED: no verified release"
    assert capsys.readouterr().err == ""


def run_watchdog(tmp_path, config: dict, *args: str, path: str = "") -> str:
    """The script as the timer runs it (python3 -I, nothing of the kit); PATH only `path` (default: nothing, so
    apt-get is not asked here and that check cannot tell)."""
    script_path = tmp_path / "watchdog.py"
    script_path.write_text(script("watchdog"))
    (tmp_path / "watchdog.json").write_text(json.dumps(config))
    argv = [sys.executable, "-I", str(script_path), "--config", str(tmp_path / "watchdog.json"),
            "--state", str(tmp_path / "state"), *(args or ("run",))]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"PATH": path or str(tmp_path)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_program_restarting_in_a_loop_or_fatal_is_an_alert(tmp_path):
    """supervisorctl's status as the app's supervisord prints it (a stand-in reading a file): a new worker pid at
    three runs in a row is a restart loop; FATAL is an alert at once."""
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "r1")  # a live release
    status = tmp_path / "status.txt"
    fake = tmp_path / "bin" / "supervisorctl"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nexec /bin/cat {status}\n")
    fake.chmod(0o755)
    config = {"host": "h", "roles": ["worker"], "current": str(tmp_path / "current"), "disk_percent": 101,
              "supervisorctl": str(fake)}  # fmt: skip

    def run(worker: str) -> dict:
        status.write_text(f"prayer-room:beat                 RUNNING   pid 7, uptime 1:00:00\n{worker}\n")
        run_watchdog(tmp_path, config)
        return json.loads(run_watchdog(tmp_path, config, "status"))["open"]

    for pid in (100, 101, 102):
        assert run(f"prayer-room:worker RUNNING pid {pid}, uptime 0:00:20") == {}
    opened = run("prayer-room:worker RUNNING pid 103, uptime 0:00:20")
    assert "restarting in a loop" in opened["program:prayer-room:worker"]["message"]
    assert run("prayer-room:worker RUNNING pid 103, uptime 0:01:20") == {}  # it stayed up: resolved
    fatal = run("prayer-room:worker FATAL Exited too quickly (process log may have details)")
    assert fatal["program:prayer-room:worker"]["message"].startswith("prayer-room:worker is FATAL: Exited too quickly")


def test_alerts_go_by_mail_through_the_programs_email_url_and_wait_while_it_does_not_answer(tmp_path):
    from tests.faults.smtp import Sink

    sink = Sink()
    env = tmp_path / "env"
    env.write_text(f"EMAIL_URL=smtp://127.0.0.1:{sink.port}\nDEFAULT_FROM_EMAIL=Prayer room <alerts@example.org>\n")
    config = {"host": "h", "roles": ["db"], "notify": ["ops@example.org"], "env_files": [str(env)], "disk_percent": 0}
    try:
        run_watchdog(tmp_path, config)
        assert sink.accepted and all(recipients == ["ops@example.org"] for recipients in sink.accepted)
        mailed = len(sink.accepted)
    finally:
        sink.close()
    config["disk_percent"] = 100  # everything resolves while the mail server is gone: kept for the next run
    assert "waiting" in run_watchdog(tmp_path, config)
    assert json.loads(run_watchdog(tmp_path, config, "status"))["outbox"] == mailed


@pytest.mark.parametrize(("days", "expected"), [(5, "expires in 5.0 days"), (30, None)])
def test_a_certificate_expiring_within_14_days_is_an_alert(tmp_path, days, expected):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert = tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
         str(tmp_path / "key.pem"), "-out", str(cert), "-days", str(days), "-subj", "/CN=prayer.example.org"],
        check=True, capture_output=True,
    )  # fmt: skip
    config = {"host": "h", "roles": ["balancer"], "disk_percent": 101, "certificate": str(cert),
              "domain": "prayer.example.org"}  # fmt: skip
    run_watchdog(tmp_path, config)
    opened = json.loads(run_watchdog(tmp_path, config, "status"))["open"]
    if expected is None:
        assert opened == {}
    else:
        assert expected in opened["certificate"]["message"] and "prayer.example.org" in opened["certificate"]["message"]
