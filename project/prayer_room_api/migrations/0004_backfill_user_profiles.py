from django.conf import settings
from django.db import migrations


def create_missing_profiles(apps, schema_editor):
    """Users created before profiles were made by signal get one with the defaults."""
    User = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    UserProfile = apps.get_model("prayer_room_api", "UserProfile")
    missing = User.objects.filter(profile__isnull=True).values_list("pk", flat=True)
    UserProfile.objects.bulk_create([UserProfile(user_id=pk) for pk in missing.iterator()], batch_size=1000)


class Migration(migrations.Migration):
    dependencies = [
        ("prayer_room_api", "0003_prayers_digests_response_notified"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(create_missing_profiles, migrations.RunPython.noop)]
