"""A user digest run killed with -9 midway, then run again: every user gets that day's digest once."""

import collections
import os
import signal
import subprocess
import sys
import time

from tests.support import stack

from .conftest import report
from .smtp import Sink

USERS = 12
SEED = f"""
from datetime import timedelta
from django.contrib.auth import get_user_model
from django.utils import timezone
from prayer_room_api.models import Location, Prayer, PrayerRequest, UserProfile
chapel = Location.objects.create(name="Digest chapel", slug="digest-chapel")
for n in range({USERS}):
    user = get_user_model().objects.create_user(f"digest{{n}}", f"digest{{n}}@faults.example", "pw")
    UserProfile.objects.filter(user=user).update(digest_frequency="daily")
    request = PrayerRequest.objects.create(content="Please pray", location=chapel, author=user)
    Prayer.objects.create(request=request, created_at=timezone.now() - timedelta(minutes=5))
"""
RUN = "from prayer_room_api import digests; print(digests.send_user_digests('daily').summary())"


def digest_run(env, port):
    return subprocess.Popen(
        [sys.executable, str(stack.MANAGE), "shell", "-c", RUN],
        env={**env, "EMAIL_URL": f"smtp://127.0.0.1:{port}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_a_digest_run_killed_midway_and_run_again_sends_every_user_once(env):
    stack.manage(env, "shell", "-c", SEED)
    sink = Sink(hold_at_mail=USERS // 2 + 1)
    try:
        first = digest_run(env, sink.port)
        assert sink.holding.wait(120), first.communicate(timeout=10)[0] if first.poll() is not None else "no MAIL"
        os.killpg(first.pid, signal.SIGKILL)  # while it waits for the mail server: half the digests are out
        first.wait(10)
        before = len(sink.accepted)
        sink.release()
        assert before == USERS // 2

        time.sleep(int(env["CELERY_TASK_TIME_LIMIT"]) + 1)  # the dead run's claims go stale after the hard limit
        second = digest_run(env, sink.port)
        output, _ = second.communicate(timeout=120)
        assert second.returncode == 0, output
        received = collections.Counter(address for message in sink.accepted for address in message)
        assert received == collections.Counter(f"digest{n}@faults.example" for n in range(USERS))
        report(f"digests: run killed after {before} of {USERS} emails; the rerun sent {len(sink.accepted) - before}")
    finally:
        sink.close()
