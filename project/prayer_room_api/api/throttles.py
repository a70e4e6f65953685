"""Rate limits of the public write endpoints, per user when signed in, else per client address.

The counters live in the default cache, so production needs a shared one (CACHE_URL=redis://...):
with a per-process cache each gunicorn worker would count on its own.
"""

import logging

from redis import RedisError
from rest_framework.throttling import UserRateThrottle

logger = logging.getLogger(__name__)


class FailOpenRateThrottle(UserRateThrottle):
    """A rate limit that lets the request through, with a warning in the log, while the cache is unreachable.

    An outage of the cache must not take the public endpoints down with it (they answered 500).
    """

    def allow_request(self, request, view):
        try:
            return super().allow_request(request, view)
        except (RedisError, OSError) as exc:
            logger.warning(
                "rate limit %r not applied: the cache is unreachable (%s: %s)", self.scope, type(exc).__name__, exc
            )
            return True

    # NOTE: DRF assigns the cached history (`self.history = self.cache.get(...)`) and then compares its entries to
    # the time: a cache entry of another shape (anyone with the Redis password can write one, with no expiry) would
    # fail every request of that client with a 500. It starts a fresh count instead, which the request then saves.
    @property
    def history(self) -> list[float]:
        return self._history

    @history.setter
    def history(self, value) -> None:
        if type(value) is not list or not all(type(entry) in (float, int) for entry in value):
            logger.warning(
                "rate limit %r: the cached history of %s is not a list of times; counting afresh", self.scope, self.key
            )
            value = []
        self._history = value


class SubmitRateThrottle(FailOpenRateThrottle):
    scope = "submit"


class PrayedRateThrottle(FailOpenRateThrottle):
    scope = "prayed"


class FlagRateThrottle(FailOpenRateThrottle):
    scope = "flag"
