"""Django Admin: the prayer room's models (domain) and the periodic task screens (schedules)."""

from . import domain, schedules  # noqa: F401
