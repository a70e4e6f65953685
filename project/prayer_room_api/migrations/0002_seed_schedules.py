from django.db import migrations


def seed(apps, schema_editor):
    from prayer_room_api import schedules

    schedules.seed(apps)


def unseed(apps, schema_editor):
    from prayer_room_api import schedules

    schedules.unseed(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("prayer_room_api", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(seed, unseed)]
