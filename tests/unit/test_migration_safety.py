"""The deploy's check of new migrations: which operations the release still running cannot live with, and why."""

import pytest
from django.db import migrations, models
from django.db.migrations.loader import MigrationLoader

from deploy.on_server.app_helper import check_migrations, unsafe_operation

APP = "prayer_room_api"


@pytest.fixture(scope="module")
def state():
    """The project's schema as its migrations leave it (no database needed)."""
    return MigrationLoader(None, ignore_no_migrations=True).project_state()


@pytest.mark.parametrize(
    "operation, fix",
    [
        (
            migrations.AddField("prayerrequest", "language", models.CharField(max_length=8, default="en")),
            "use db_default='en' (the database fills it in), or null=True, or split into two deploys",
        ),
        (migrations.AddField("prayerrequest", "rank", models.IntegerField()), "use db_default=..."),
        (migrations.RemoveField("prayerrequest", "response"), "split it into two deploys"),
        (migrations.RenameField("prayerrequest", "response", "answer"), "add the new field beside the old one"),
        (migrations.RenameModel("Location", "Place"), "Meta.db_table"),
        (migrations.DeleteModel("Location"), "SeparateDatabaseAndState"),
        (migrations.AlterField("prayerrequest", "approved_at", models.DateTimeField()), "give it a db_default"),
    ],
    ids=["add-not-null-default", "add-not-null", "remove", "rename-field", "rename-model", "delete", "to-not-null"],
)
def test_an_incompatible_operation_is_named_with_its_fix(state, operation, fix):
    problem = unsafe_operation(APP, operation, state.clone())
    assert problem is not None
    assert fix in problem[1]


@pytest.mark.parametrize(
    "operation",
    [
        migrations.AddField("prayerrequest", "language", models.CharField(max_length=8, db_default="en")),
        migrations.AddField("prayerrequest", "language", models.CharField(max_length=8, null=True)),
        migrations.AddField("prayerrequest", "tags", models.ManyToManyField("prayer_room_api.Location")),
        migrations.AlterField("prayerrequest", "approved_at", models.DateTimeField(null=True, db_index=True)),
        migrations.AddIndex("prayerrequest", models.Index(fields=["type"], name="request_type_idx")),
        migrations.CreateModel("Note", [("id", models.AutoField(primary_key=True))]),
        migrations.RunSQL("SELECT 1", migrations.RunSQL.noop),
    ],
    ids=["db-default", "nullable", "m2m", "still-nullable", "index", "new-table", "sql"],
)
def test_a_compatible_operation_passes(state, operation):
    assert unsafe_operation(APP, operation, state.clone()) is None


def test_check_migrations_walks_the_state_through_each_migration():
    """A field added nullable and made NOT NULL in the next migration is caught in the second."""

    class Loader:
        def project_state(self, node, at_end=True):
            return MigrationLoader(None, ignore_no_migrations=True).project_state()

    first = migrations.Migration("0100_add", APP)
    first.operations = [migrations.AddField("prayerrequest", "mood", models.CharField(max_length=8, null=True))]
    second = migrations.Migration("0101_not_null", APP)
    second.operations = [migrations.AlterField("prayerrequest", "mood", models.CharField(max_length=8))]
    found = check_migrations([(first, False), (second, False)], Loader())
    assert [item["migration"] for item in found] == [f"{APP}.0101_not_null"]
    assert "NOT NULL" in found[0]["problem"] and found[0]["operation"].startswith("Alter field mood")
