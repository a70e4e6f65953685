"""`invoke dev`: the local stack under supervisord with embedded defaults, stopped by Ctrl-C."""

import json
import os
import re
import signal
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery

from tests.support import stack

pytestmark = pytest.mark.integration
INVOKE = Path(sys.executable).parent / "invoke"


def processes_with_env(marker: str) -> list[int]:
    """PIDs whose environment contains `marker` (the stack's VAR_DIR)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_invoke_dev_runs_three_processes_on_sqlite_and_a_filesystem_broker_and_ctrl_c_stops_all(tmp_path):
    var = tmp_path / "var"
    port = stack.free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env.update(VAR_DIR=str(var), PYTHONUNBUFFERED="1")
    dev = stack.Process("invoke-dev", env, tmp_path, argv=[str(INVOKE), "dev", "--port", str(port)])
    try:
        base = f"http://127.0.0.1:{port}"
        dev.wait_for_http(f"{base}/health/", timeout=120)
        dev.wait_for(lambda: "ready." in _read(var / "log" / "worker.log"), 60, "worker ready")

        # What a browser gets: a styled admin (WhiteNoise serves collected static files), API docs at /
        # whose Swagger UI comes from this server, and demo data to look at.
        css = get(f"{base}/static/admin/css/base.css")
        assert css.status == 200 and b"body" in css.body
        docs = get(f"{base}/")
        assert docs.status == 200
        scripts = re.findall(r'src="(/static/[^"]+\.js)"', docs.body.decode())
        assert scripts and all(get(base + src).status == 200 for src in scripts), scripts
        assert "chapel" in [location["slug"] for location in json.loads(get(f"{base}/api/locations/").body)]

        broker = var / "celery" / "broker"
        client = Celery(
            broker="filesystem://",
            backend=f"file://{var / 'celery' / 'results'}",
            broker_transport_options={
                "data_folder_in": str(broker / "out"),
                "data_folder_out": str(broker / "out"),
                "processed_folder": str(broker / "processed"),
                "control_folder": str(broker / "control"),
            },
        )
        assert client.send_task("prayer_room_api.tasks.ping").get(timeout=60)["release"] == "dev"
        assert "DatabaseScheduler" in _read(var / "log" / "beat.log")
        assert (var / "db.sqlite3").is_file()
        assert len(processes_with_env(str(var))) >= 4, "supervisord plus web, worker and beat"
        assert list((broker / "control").glob("*.exchange")), "kombu's control files belong in var/"

        # The terminal shows each process's own output, prefixed with its name, and no CRIT warnings.
        dev.wait_for(lambda: "worker  | " in dev.output() and "beat    | " in dev.output(), 60, "prefixed output")
        output = dev.output()
        assert "web on http://127.0.0.1:" in output and "staff sign-in at /admin/: user demo-staff" in output
        assert re.search(r"^web-1   \| .*Listening at: http://127\.0\.0\.1", output, re.M), output[-3000:]
        assert re.search(r"^worker  \| .*celery@\S+ ready\.", output, re.M)
        assert re.search(r"^beat    \| .*beat: Starting\.\.\.", output, re.M)
        assert "worker  | [supervisord] running" in output
        assert " CRIT " not in output
    finally:
        dev.popen.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        code = dev.popen.wait(90)
        dev.stop()
    assert code == 0, dev.output()
    assert processes_with_env(str(var)) == [], "Ctrl-C left processes running"
    assert "Shutting down: Master" in dev.output(), "the last lines are shown too"
    assert not (stack.REPO / "project" / "control").exists()


@dataclass
class Response:
    status: int
    body: bytes


def get(url: str) -> Response:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return Response(response.status, response.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read())


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
