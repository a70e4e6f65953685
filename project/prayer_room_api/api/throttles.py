"""Rate limits of the public write endpoints, per user when signed in, else per client address.

The counters live in the default cache, so production needs a shared one (CACHE_URL=redis://...):
with a per-process cache each gunicorn worker would count on its own.
"""

from rest_framework.throttling import UserRateThrottle


class SubmitRateThrottle(UserRateThrottle):
    scope = "submit"


class PrayedRateThrottle(UserRateThrottle):
    scope = "prayed"


class FlagRateThrottle(UserRateThrottle):
    scope = "flag"
