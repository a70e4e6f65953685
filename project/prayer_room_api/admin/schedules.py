"""Periodic task screens, as staff edit the schedules that beat runs."""

from django.contrib import admin
from django_celery_beat.admin import PeriodicTaskAdmin as BeatPeriodicTaskAdmin
from django_celery_beat.models import PeriodicTask

admin.site.unregister(PeriodicTask)


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(BeatPeriodicTaskAdmin):
    """django-celery-beat's admin (its form and enable/disable actions), with a list staff can read."""

    list_display = ("name", "task", "schedule_in_words", "enabled", "last_run")
    list_display_links = ("name",)
    list_filter = ("enabled", "task")
    search_fields = ("name", "task", "description")
    ordering = ("name",)
    # NOTE: upstream sets a date hierarchy on start_time, which the seeded tasks leave empty.
    date_hierarchy = None

    @admin.display(description="schedule")
    def schedule_in_words(self, task: PeriodicTask) -> str:
        """The schedule as a sentence ("At 08:00 AM UTC", "every 2 seconds"), whatever its kind."""
        if task.crontab is not None:
            return task.crontab.human_readable
        schedule = task.interval or task.solar or task.clocked
        return str(schedule) if schedule else "no schedule"

    @admin.display(description="last run", ordering="last_run_at")
    def last_run(self, task: PeriodicTask):
        """When beat last sent the task; disabling clears it (django-celery-beat's rule)."""
        return task.last_run_at

    def crontab_translation(self, task: PeriodicTask) -> str:
        """The crontab in words on the change form; empty for other kinds (upstream raises on them)."""
        return task.crontab.human_readable if task and task.crontab is not None else "-"
