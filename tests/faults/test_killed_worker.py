"""kill -9 of the worker and of a pool child while they hold tasks: every task runs to its end, once.

The module's CELERY_TASK_TIME_LIMIT is 5 s, so the visibility timeout (2 limits + 30 s) is 40 s.
"""

import collections
import os
import re
import signal
import subprocess
import time

from .conftest import RECEIVED, SUCCEEDED, report

ACCEPTED = re.compile(r"Task accepted: prayer_room_api\.tasks\.ping\[([^\]]+)\] pid:(\d+)")


def ids(pattern, *processes) -> collections.Counter:
    return collections.Counter(i for p in processes for i in pattern.findall(p.output()))


def all_succeeded(app, task_ids) -> bool:
    return all(app.AsyncResult(i).state == "SUCCESS" for i in task_ids)


def test_tasks_held_by_a_worker_killed_with_sigkill_run_again(start, celery_client):
    first = start("worker")
    first.wait_for_output("ready.", 60)
    task_ids = [celery_client.send_task("prayer_room_api.tasks.ping", args=[0.5]).id for _ in range(12)]
    first.wait_for(lambda: sum(ids(SUCCEEDED, first).values()) >= 2, 60, "two tasks done")
    os.killpg(first.popen.pid, signal.SIGKILL)  # the worker and its pool children, as a dying host would
    killed_at = time.monotonic()
    first.popen.wait(10)
    stranded = set(ids(RECEIVED, first)) - set(ids(SUCCEEDED, first))
    assert stranded, "the worker held no task when it was killed"

    second = start("worker")
    second.wait_for(lambda: stranded <= set(ids(RECEIVED, second)), 120, "the stranded tasks redelivered")
    redelivered = time.monotonic() - killed_at
    second.wait_for(lambda: all_succeeded(celery_client, task_ids), 60, "every task done")
    done = ids(SUCCEEDED, first, second)
    assert set(done) == set(task_ids)
    assert max(done.values()) == 1, f"a task ran to its end twice: {done.most_common(3)}"
    report(f"worker: {len(stranded)} tasks held by a worker killed with -9 ran again {redelivered:.1f} s later")


def test_the_task_of_a_pool_child_killed_with_sigkill_runs_again(start, celery_client):
    worker = start("worker", LOG_LEVEL="debug")  # debug: the worker logs which pool child accepted each task
    worker.wait_for_output("ready.", 60)
    task_ids = [celery_client.send_task("prayer_room_api.tasks.ping", args=[3]).id for _ in range(2)]

    def accepted_by() -> dict[str, int]:
        """The pool child that took each task (it runs for 3 s), as the worker logged it."""
        return {task: int(pid) for task, pid in ACCEPTED.findall(worker.output())}

    worker.wait_for(lambda: set(task_ids) <= set(accepted_by()), 60, "both tasks accepted by pool children")
    children = subprocess.run(["pgrep", "-P", str(worker.popen.pid)], capture_output=True, text=True).stdout.split()
    child = accepted_by()[task_ids[0]]
    assert str(child) in children, f"pool child {child} of the first task is not running: {children}"
    os.kill(child, signal.SIGKILL)
    killed_at = time.monotonic()
    worker.wait_for(lambda: max(ids(RECEIVED, worker).values()) >= 2, 60, "the killed child's task redelivered")
    redelivered = time.monotonic() - killed_at
    worker.wait_for(lambda: all_succeeded(celery_client, task_ids), 60, "both tasks done")
    assert "WorkerLostError" in worker.output() or "signal 9" in worker.output()
    assert ids(SUCCEEDED, worker) == collections.Counter(task_ids)
    report(f"worker: the task of a pool child killed with -9 was delivered again {redelivered:.1f} s later")
