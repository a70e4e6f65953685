from django.db import migrations

NAMES = ("send-outbox",)


def seed(apps, schema_editor):
    from prayer_room_api import schedules

    schedules.seed(apps, [s for s in schedules.SCHEDULES if s.name in NAMES])


def unseed(apps, schema_editor):
    from prayer_room_api import schedules

    schedules.unseed(apps, [s for s in schedules.SCHEDULES if s.name in NAMES])


class Migration(migrations.Migration):
    dependencies = [("prayer_room_api", "0005_outbox")]

    operations = [migrations.RunPython(seed, unseed)]
