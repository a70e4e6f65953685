"""`invoke dev`: the local stack under supervisord with embedded defaults, stopped by Ctrl-C."""

import os
import signal
import sys
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
        dev.wait_for_http(f"http://127.0.0.1:{port}/health/", timeout=120)
        dev.wait_for(lambda: "ready." in _read(var / "log" / "worker.log"), 60, "worker ready")

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
    finally:
        dev.popen.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        code = dev.popen.wait(90)
        dev.stop()
    assert code == 0, dev.output()
    assert processes_with_env(str(var)) == [], "Ctrl-C left processes running"


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
