"""Periodic task screens, as staff edit the schedules that beat runs."""
