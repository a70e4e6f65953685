"""The cache stores JSON (prayer_room_api/cache.py), in Redis as in production: what the app caches reads back as
itself, a value JSON cannot hold is refused when it is stored, and an entry someone wrote to Redis in pickle runs
nothing: it reads as a miss, and a rate limit keyed there still answers and counts."""

import logging
import os
import pickle
import shlex
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import redis
from django.core.cache import cache
from django.core.cache.backends.redis import RedisCache
from django.test import RequestFactory
from rest_framework.request import Request
from rest_framework.throttling import UserRateThrottle

from prayer_room_api.cache import JSONRedisCacheClient

REQUESTS = "/api/requests/"


class ShellCommand:
    """Unpickling it runs a shell command: what a pickle someone wrote to a cache key does where it is read."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def pickled_touch(path) -> bytes:
    return pickle.dumps(ShellCommand(f"touch {shlex.quote(str(path))}"))


@pytest.fixture
def raw(session_cache):
    """The cache's Redis db, read and written directly (as anyone holding its password can)."""
    client = redis.Redis.from_url(session_cache["LOCATION"])
    yield client
    client.close()


@pytest.fixture
def pickling_cache(session_cache):
    """Django's own RedisCache (RedisSerializer: pickle) on the same keys: the positive control."""
    return RedisCache(session_cache["LOCATION"], {"KEY_PREFIX": session_cache["KEY_PREFIX"], "VERSION": 2})


THROTTLE_HISTORY = [time.time() - n * 0.37 for n in range(60)]


@pytest.mark.parametrize(
    "value",
    [
        THROTTLE_HISTORY,  # what DRF's rate limits store: the times of a client's recent requests, newest first
        [],
        0,
        -7,
        2**63 - 1,
        10**30,
        1.0,
        0.1,
        True,
        False,
        None,
        "",
        "gebed ✓ \x00 \"'",
        {"nested": [1, 2.5, {"a": None, "b": [True, "x"]}]},
    ],
    ids=repr,
)
def test_what_the_app_caches_reads_back_as_itself(value):
    cache.set("value", value, 60)
    read = cache.get("value", "missing")
    assert read == value and type(read) is type(value)
    cache.set_many({"one": value, "two": [value]}, 60)
    assert cache.get_many(["one", "two", "absent"]) == {"one": value, "two": [value]}


def test_ints_are_redis_integers_so_incr_counts_in_redis(raw):
    cache.set("count", 5, 60)
    assert raw.get(cache.make_key("count")) == b"5"
    assert cache.incr("count") == 6 and cache.incr("count", 10) == 16 and cache.decr("count") == 15
    assert cache.get("count") == 15
    # django-axes' cache handler, were it configured: add 1, then incr.
    assert cache.add("failures", 1, 60) and not cache.add("failures", 1, 60)
    assert cache.incr("failures") == 2
    with pytest.raises(ValueError, match="not found"):
        cache.incr("absent")
    cache.set("flag", True, 60)
    assert raw.get(cache.make_key("flag")) == b"true" and cache.get("flag") is True


@pytest.mark.parametrize(
    "value",
    [
        (1.5, 2.5),  # would read back as a list
        [("nested", 1)],
        {1: "a"},  # would read back with the key "1"
        datetime.now(UTC),
        Decimal("1.5"),
        {"a", "b"},
        b"bytes",
        float("nan"),
        float("inf"),
        object(),
    ],
    ids=repr,
)
def test_a_value_json_cannot_hold_is_refused_when_stored(value):
    for store in (
        lambda: cache.set("value", value, 60),
        lambda: cache.add("value", value, 60),
        lambda: cache.set_many({"value": value}, 60),
        lambda: cache.get_or_set("value", value, 60),
    ):
        with pytest.raises(TypeError, match="the cache stores JSON only"):
            store()
    assert cache.get("value", "missing") == "missing"


def test_a_planted_pickle_runs_nothing_and_reads_as_a_miss(raw, pickling_cache, tmp_path, caplog):
    ran = tmp_path / "ran"
    raw.set(cache.make_key("planted"), pickled_touch(ran))
    cache.set("fine", [1.5], 60)
    caplog.set_level(logging.WARNING, logger="prayer_room_api.cache")

    assert cache.get("planted", "default") == "default"
    assert cache.get_many(["planted", "fine"]) == {"fine": [1.5]}
    assert cache.get_or_set("planted", [2.5], 60) == [2.5]
    assert not ran.exists()
    raw.set(cache.make_key("deep"), b"[" * 100_000 + b"]" * 100_000)
    assert cache.get("deep", "default") == "default"
    assert f"cache entry {cache.make_key('planted')} is not JSON" in caplog.text

    # The control: Django's own serializer unpickles the same entry, and the command runs.
    assert pickling_cache.get("planted") == 0
    assert ran.exists()


def test_the_backend_takes_no_other_serializer(session_cache):
    with pytest.raises(Exception, match="always stores JSON"):
        JSONRedisCacheClient([session_cache["LOCATION"]], serializer="django.core.cache.backends.redis.RedisSerializer")


class DRFSubmitThrottle(UserRateThrottle):
    """DRF's own rate limit of the same scope, without the project's check of what the cache holds."""

    scope = "submit"


def submit(api):
    return api.post(REQUESTS, {"content": "Please pray", "location": "chapel"}, format="json")


def test_a_planted_pickle_under_a_throttle_key_runs_nothing_and_the_client_is_still_limited(
    api, location, raw, pickling_cache, tmp_path
):
    limit = DRFSubmitThrottle().num_requests
    ran = tmp_path / "ran"
    key = cache.make_key("throttle_submit_127.0.0.1")  # DRF's key for the test client's address
    raw.set(key, pickled_touch(ran))

    assert submit(api).status_code == 201
    assert not ran.exists()
    history = cache.get("throttle_submit_127.0.0.1")
    assert type(history) is list and len(history) == 1  # the rate limit read this key, and wrote a fresh count
    assert [submit(api).status_code for _ in range(limit)] == [201] * (limit - 1) + [429]

    raw.set(key, pickled_touch(ran))  # the control
    pickling_cache.get("throttle_submit_127.0.0.1")
    assert ran.exists()


@pytest.mark.parametrize("entry", [b'"x"', b'{"a":1}', b"[null]", b"5"])
def test_a_throttle_entry_of_another_shape_starts_a_fresh_count(api, location, raw, entry, caplog):
    key = cache.make_key("throttle_submit_127.0.0.1")
    raw.set(key, entry)
    # The control: DRF's throttle fails on it (a 500 for every request of the client while the entry lasts).
    with pytest.raises((TypeError, KeyError)):
        DRFSubmitThrottle().allow_request(Request(RequestFactory().post(REQUESTS)), None)

    assert submit(api).status_code == 201
    assert len(cache.get("throttle_submit_127.0.0.1")) == 1
    assert "the cached history of" in caplog.text
