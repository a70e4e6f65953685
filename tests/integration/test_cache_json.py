"""A pickle written to Redis with the app's own Redis login (what a stolen password gives) under the key the web's
rate limit reads: `prodserver web` on the production settings runs nothing, answers, and counts the client afresh;
Django's own RedisCache, pickling, on the same key and entry runs the command (the control)."""

import json
import os
import pickle
import shlex

import pytest
import redis
import requests
from django.core.cache.backends.redis import RedisCache

from tests.support import stack

pytestmark = pytest.mark.integration

LIMIT = 3
CLIENT = "203.0.113.7"  # the address nginx would pass in X-Forwarded-For
SEED = 'from prayer_room_api.models import Location; Location.objects.create(name="Chapel", slug="chapel")'
# The production cache's key layout (settings/production.py): KEY_PREFIX, VERSION, DRF's key for the client.
KEY_PREFIX, VERSION, THROTTLE_KEY = "prayer-room:cache", 2, f"throttle_submit_{CLIENT}"


class ShellCommand:
    """Unpickling it runs a shell command: what a pickle someone wrote to a cache key does where it is read."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def web(env, tmp_path_factory):
    stack.manage(env, "shell", "-c", SEED)
    port = stack.free_port()
    process = stack.Process(
        "web", {**env, "PORT": str(port), "THROTTLE_SUBMIT": f"{LIMIT}/hour"}, tmp_path_factory.mktemp("web")
    )
    base_url = f"http://127.0.0.1:{port}"
    process.wait_for_http(f"{base_url}/health/")
    yield base_url, process
    process.stop()


def test_a_pickle_planted_under_a_throttle_key_runs_nothing_in_the_web_and_the_client_is_still_limited(
    web, env, tmp_path
):
    base_url, process = web
    ran = tmp_path / "ran"
    planted = pickle.dumps(ShellCommand(f"touch {shlex.quote(str(ran))}"))
    app_login = redis.Redis.from_url(env["CACHE_URL"])  # the app's ACL user, as a stolen password logs in
    key = f"{KEY_PREFIX}:{VERSION}:{THROTTLE_KEY}"
    app_login.set(key, planted)

    def submit() -> requests.Response:
        body = {"content": "Please pray", "location": "chapel"}
        return requests.post(f"{base_url}/api/requests/", json=body, headers={"X-Forwarded-For": CLIENT}, timeout=10)

    first = submit()
    assert first.status_code == 201, first.text[:500]
    assert not ran.exists()
    # The rate limit read that very key, took the pickle for a miss, and wrote a fresh count there in JSON.
    history = json.loads(app_login.get(key))
    assert type(history) is list and len(history) == 1 and type(history[0]) is float
    assert f"cache entry {key} is not JSON" in process.output()
    assert [submit().status_code for _ in range(LIMIT)] == [201] * (LIMIT - 1) + [429]
    assert not ran.exists()

    # The control: the same entry under the same key, read by Django's RedisCache with its default serializer.
    app_login.set(key, planted)
    pickling = RedisCache(env["CACHE_URL"], {"KEY_PREFIX": KEY_PREFIX, "VERSION": VERSION})
    pickling.get(THROTTLE_KEY)
    assert ran.exists()
    app_login.close()
