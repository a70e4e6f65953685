from io import StringIO

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_models_match_migrations():
    out = StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit:  # --check exits non-zero when a migration is missing
        pytest.fail(f"models and migrations differ; run makemigrations:\n{out.getvalue()}")
    assert "No changes detected" in out.getvalue()


@pytest.mark.django_db
def test_profiles_backfill_reaches_users_created_before_the_signal(django_user_model):
    from django.apps import apps
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    user = django_user_model.objects.create_user("early")
    user.profile.delete()
    migration = MigrationExecutor(connection).loader.get_migration("prayer_room_api", "0004_backfill_user_profiles")
    forwards = migration.operations[0].code
    forwards(apps, None)
    user.refresh_from_db()
    assert user.profile.digest_frequency == "none"
