"""Two beats side by side: one dispatches, the other waits; kill -9 of the leader and the standby takes over."""

import re
import signal
import time

from prayer_room_api.beat import LOCK_KEY

from .conftest import add_interval_task, report

SENT = re.compile(r"Sending due task fault-tick ")


def sent(process) -> int:
    return len(SENT.findall(process.output()))


def test_one_of_two_beats_dispatches_and_the_standby_takes_over_when_it_is_killed(start, database):
    add_interval_task(database, "fault-tick", "prayer_room_api.tasks.ping", every=1)
    first = start("beat")
    first.wait_for_output("took the leader lock", 60)
    second = start("beat")
    second.wait_for_output("standby: the leader lock is held by prayer-room beat", 60)

    first.wait_for(lambda: sent(first) >= 3, 60, "the leader dispatching")
    before, started = sent(first), time.monotonic()
    time.sleep(10)
    window, during = time.monotonic() - started, sent(first) - before
    assert sent(second) == 0, "the standby dispatched while the leader held the lock"
    report(f"beat: two beats, a 1 s task: {during} dispatches in {window:.1f} s (ratio {during / window:.2f})")
    holders = database.query(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s AND objid = %s"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        LOCK_KEY,
    )
    assert holders == [(1,)]

    killed_at = time.monotonic()
    first.popen.send_signal(signal.SIGKILL)
    second.wait_for_output("took the leader lock", 60)
    failover = time.monotonic() - killed_at
    second.wait_for(lambda: sent(second) >= 3, 30, "the new leader dispatching")
    report(f"beat: standby took the leader lock {failover:.1f} s after kill -9 of the leader")
