"""The programs as the app's Redis ACL user (the rules `fab provision` renders, tests/support/services.py): remote
control and results work under the key prefix; keys and channels outside it are refused; provision's move of an
older server's keys under the prefix keeps every queued and unacknowledged message."""

import pytest
import redis
from celery import Celery

from deploy.render.db_host import REDIS_KEY_PREFIX, REDIS_MOVE_UNDER_PREFIX
from tests.support import services

pytestmark = pytest.mark.integration


def test_a_worker_answers_remote_control_and_stores_results_as_the_acl_user(start, celery_client):
    worker = start("worker", RELEASE="it-acl")
    worker.wait_for_output("ready.", timeout=60)
    # Broadcast on the pidbox's fanout channel, replies through a reply queue: both under the prefix.
    replies = celery_client.control.inspect(timeout=5).ping()
    assert replies and all(reply == {"ok": "pong"} for reply in replies.values()), replies
    result = celery_client.send_task("prayer_room_api.tasks.ping")
    assert result.get(timeout=30)["release"] == "it-acl"
    assert "NoPermission" not in worker.output() and "NOPERM" not in worker.output()


def test_the_acl_user_is_refused_outside_the_prefix_and_the_default_user_is_not(env, redis_db):
    app = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    admin = redis.Redis.from_url(f"{services.redis_url()}/{redis_db}")  # the control: the harness's default user
    admin.set("other:key", "x")
    outside = [
        lambda client: client.get("other:key"),
        lambda client: client.eval("return redis.call('GET', KEYS[1])", 1, "other:key"),
        lambda client: client.eval("return redis.call('GET', 'other:key')", 0),
        lambda client: client.publish("other-channel", "x"),
        lambda client: client.execute_command("CONFIG", "GET", "dir"),
        lambda client: client.flushdb(),
    ]
    for attempt in outside:
        # A key a script touches without declaring it is refused inside the script: an error of the script's.
        with pytest.raises(redis.exceptions.ResponseError, match="NOPERM|no permissions|can't access"):
            attempt(app)
    assert app.set(f"{REDIS_KEY_PREFIX}x", "1") and app.eval(
        "return redis.call('GET', KEYS[1])", 1, f"{REDIS_KEY_PREFIX}x"
    )
    for attempt in outside:
        attempt(admin)  # each runs for a user with every permission


def test_provisions_move_under_the_prefix_keeps_queued_and_unacknowledged_messages(start, redis_db, celery_client):
    admin = redis.Redis.from_url(f"{services.redis_url()}/{redis_db}")
    old = Celery(broker=f"{services.redis_url()}/{redis_db}")  # as a release from before the prefix publishes
    task_ids = [old.send_task("prayer_room_api.tasks.ping").id for _ in range(3)]
    old.close()
    admin.hset("unacked", "tag-1", '[{"body": "x"}, "", "celery"]')
    admin.zadd("unacked_index", {"tag-1": 12.5})
    assert admin.llen("celery") == 3 and not admin.exists(f"{REDIS_KEY_PREFIX}celery")

    moved = admin.eval(REDIS_MOVE_UNDER_PREFIX, 0, REDIS_KEY_PREFIX)

    assert moved >= 4 and not [key for key in admin.scan_iter() if not key.startswith(REDIS_KEY_PREFIX.encode())]
    assert admin.hget(f"{REDIS_KEY_PREFIX}unacked", "tag-1") and admin.zscore(
        f"{REDIS_KEY_PREFIX}unacked_index", "tag-1"
    )
    admin.delete(f"{REDIS_KEY_PREFIX}unacked", f"{REDIS_KEY_PREFIX}unacked_index")  # no worker may restore the fake
    worker = start("worker", RELEASE="it-moved")
    worker.wait_for_output("ready.", timeout=60)
    assert [celery_client.AsyncResult(task_id).get(timeout=30)["release"] for task_id in task_ids] == ["it-moved"] * 3
