"""Django's Redis cache with its entries in JSON instead of pickle.

Django's RedisSerializer unpickles whatever a cache key holds, so anyone who can write one key (the app's Redis
password is enough) runs code in every web worker that reads it: a throttle counter is read on every POST. What
the app caches is plain data (DRF's throttle histories: lists of timestamps), which JSON holds.
"""

import json
import logging
import math

from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

_MISS = object()


def _check_storable(value, where: str = "value") -> None:
    """Raise TypeError unless `value` reads back from JSON as itself: no tuple (it would come back a list), no
    non-string dict key (a string), no datetime, set, bytes or model instance (json cannot write them at all)."""
    kind = type(value)
    if value is None or kind in (str, int, bool):
        return
    if kind is float:
        if not math.isfinite(value):
            raise TypeError(f"the cache stores JSON only: {where} is {value!r}, which JSON has no number for")
        return
    if kind is list:
        for index, item in enumerate(value):
            _check_storable(item, f"{where}[{index}]")
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"the cache stores JSON only: {where} has a {type(key).__name__} key {key!r}")
            _check_storable(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"the cache stores JSON only: {where} is a {kind.__name__}; store str, int, float, bool, None, list or dict "
        "(a datetime as its isoformat(), a model by its primary key)"
    )


class JSONSerializer:
    """RedisCacheClient's serializer interface (dumps, loads) in JSON; an int is stored as a Redis integer, as
    Django's RedisSerializer does, so that incr() and decr() work on it."""

    def dumps(self, value):
        if type(value) is int:  # not bool: True would read back as 1
            return value
        _check_storable(value)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()

    def loads(self, data: bytes):
        """The stored value; ValueError for bytes that are not JSON (a pickle, say), which nothing here executes."""
        try:
            return int(data)
        except ValueError:
            return json.loads(data)


class JSONRedisCacheClient(RedisCacheClient):
    """Reads an entry that is not JSON as a miss, with a warning: a cache entry is only ever a copy, and an error
    would fail every request that reads the key (a client's throttle counter) until it expired, if ever."""

    def __init__(self, servers, **options):
        if "serializer" in options:
            raise ImproperlyConfigured(
                "prayer_room_api.cache.JSONRedisCache always stores JSON: remove OPTIONS['serializer'] from CACHES."
            )
        super().__init__(servers, serializer=JSONSerializer, **options)

    def _loads(self, key: str, data: bytes, default):
        try:
            return self._serializer.loads(data)
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
            logger.warning(
                "cache entry %s is not JSON (%d bytes, starting %r): read as a miss", key, len(data), data[:16]
            )
            return default

    def get(self, key, default):
        data = self.get_client(key).get(key)
        return default if data is None else self._loads(key, data, default)

    def get_many(self, keys):
        keys = list(keys)
        found = {}
        for key, data in zip(keys, self.get_client(None).mget(keys), strict=True):
            value = _MISS if data is None else self._loads(key, data, _MISS)
            if value is not _MISS:
                found[key] = value
        return found


class JSONRedisCache(RedisCache):
    """Django's RedisCache (same OPTIONS, keys and commands), its entries JSON: CACHES' BACKEND in production."""

    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = JSONRedisCacheClient
