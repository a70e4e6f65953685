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


class SubmitRateThrottle(FailOpenRateThrottle):
    scope = "submit"


class PrayedRateThrottle(FailOpenRateThrottle):
    scope = "prayed"


class FlagRateThrottle(FailOpenRateThrottle):
    scope = "flag"
