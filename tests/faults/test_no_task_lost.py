"""Nothing handed to the broker is lost when a worker is killed with -9 in the middle of a batch.

kombu's Redis transport takes a message off the queue (BRPOP) before it records it as unacknowledged; a worker
killed in between lost it. The project's transport (prayer_room_api/broker.py) does both in one step.
The module's CELERY_TASK_TIME_LIMIT is 5 s, so the visibility timeout (2 limits + 30 s) is 40 s.
"""

import json
import os
import signal
import time

import pytest
import redis
from kombu import Connection
from kombu.transport.redis import Transport as KombuRedisTransport

from deploy.render.db_host import REDIS_KEY_PREFIX
from prayer_room_api.broker import Transport as ProjectRedisTransport

from .conftest import report

TASKS = 10_000
ROUNDS = 5
# Keys as the project's settings name them (global_keyprefix): the app's Redis ACL user may touch nothing else.
QUEUE = "celery"
OPTIONS = {"global_keyprefix": REDIS_KEY_PREFIX}
QUEUE_KEY, UNACKED, UNACKED_INDEX = (REDIS_KEY_PREFIX + name for name in (QUEUE, "unacked", "unacked_index"))


def tasks_run(client: redis.Redis, task_ids: list[str]) -> set[str]:
    """The tasks whose result the worker stored: the pool child writes it once the task has run."""
    done = set()
    for start in range(0, len(task_ids), 2000):
        chunk = task_ids[start : start + 2000]
        pipe = client.pipeline(transaction=False)
        for task_id in chunk:
            pipe.exists(f"{REDIS_KEY_PREFIX}celery-task-meta-{task_id}")
        done.update(task_id for task_id, exists in zip(chunk, pipe.execute(), strict=True) if exists)
    return done


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def test_every_task_runs_when_the_worker_is_killed_five_times_mid_batch(start, celery_client, env):
    client = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    began = time.monotonic()
    with celery_client.producer_or_acquire() as producer, producer.batch():
        task_ids = [celery_client.send_task("prayer_room_api.tasks.ping", producer=producer).id for _ in range(TASKS)]
    assert client.llen(QUEUE_KEY) == TASKS
    sent = time.monotonic() - began

    for round_ in range(ROUNDS):
        worker = start("worker")
        target = (round_ + 1) * TASKS // (ROUNDS + 1)
        worker.wait_for(lambda t=target: len(tasks_run(client, task_ids)) >= t, 300, f"{target} tasks run")
        assert client.llen(QUEUE_KEY) > 0, "the batch ran out before the kill"
        if round_ % 2:
            os.killpg(worker.popen.pid, signal.SIGKILL)  # the worker and its pool children, as a dying host would
        else:
            os.kill(worker.popen.pid, signal.SIGKILL)  # the main process only: its pool children finish their task
        worker.popen.wait(10)
    killed_at = time.monotonic()

    last = start("worker")
    last.wait_for(lambda: len(tasks_run(client, task_ids)) == TASKS, 300, f"all {TASKS} tasks run")
    report(
        f"queue: {TASKS} of {TASKS} tasks ran through {ROUNDS} kill -9s of the worker mid-batch; "
        f"the last ran {time.monotonic() - killed_at:.1f} s after the last kill; "
        f"{time.monotonic() - began:.1f} s in all ({sent:.1f} s to send)"
    )


@pytest.mark.parametrize(
    ("transport", "kept"),
    [(ProjectRedisTransport, True), (KombuRedisTransport, False)],
    ids=["project-transport", "kombu-transport-loses-it"],
)
def test_a_message_taken_by_a_consumer_that_dies_at_once_is_kept_as_unacknowledged(env, transport, kept):
    """A consumer that dies right after taking a message (before reading the reply): the message stays in Redis.

    The positive control: kombu's own transport, which takes first and records afterwards, loses it.
    """
    client = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    client.delete(QUEUE_KEY, UNACKED, UNACKED_INDEX)
    with Connection(env["CELERY_BROKER_URL"], transport=transport, transport_options=OPTIONS) as publisher:
        publisher.SimpleQueue(QUEUE).put({"n": 1})
    message = json.loads(client.lindex(QUEUE_KEY, 0))

    with Connection(env["CELERY_BROKER_URL"], transport=transport, transport_options=OPTIONS) as consumer:
        channel = consumer.default_channel
        channel.basic_consume(QUEUE, no_ack=False, callback=lambda message: None, consumer_tag="killed")
        channel.connection.cycle.on_poll_start()  # what the worker's event loop runs each tick: take a message
        wait_until(lambda: client.llen(QUEUE_KEY) == 0, 10, "message taken")
        channel.client.connection.disconnect()  # killed before it read the reply
        channel._in_poll = None  # nothing to read when the connection closes

    tag = message["properties"]["delivery_tag"]
    recorded, indexed = client.hget(UNACKED, tag), client.zscore(UNACKED_INDEX, tag)
    client.delete(UNACKED, UNACKED_INDEX)  # no worker of this module may restore the test's message
    if not kept:
        assert recorded is None, "kombu's transport recorded the message: the control no longer shows the loss"
        return
    info = message["properties"]["delivery_info"]
    assert json.loads(recorded) == [message, info["exchange"], info["routing_key"]], "not the entry kombu restores"
    assert indexed is not None, "not in the index the visibility timeout is checked against"
