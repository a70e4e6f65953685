"""Which release serves restored data (deploy/schema.py's choose_release), decided on the data's migrations against
each release's, without a server; and the operations the app helper reports for a migration."""

from __future__ import annotations

import pytest
from django.db import migrations, models

from deploy.errors import DeployError
from deploy.on_server.app_helper import operation_kinds
from deploy.schema import SchemaReport, choose_release

ADD = ["AddField"]
R1, R2, R3 = "20261201000000-aaaaaaaaaaaa", "20261202000000-bbbbbbbbbbbb", "20261203000000-cccccccccccc"
BASE = {"app.0001_initial": ["CreateModel"], "app.0002_seed": ["RunPython"]}


def world(data: set[str], releases: dict[str, dict[str, list[str]]]):
    """`report_of` for releases (each: its migrations, in order, with their operations' kinds) against data whose
    django_migrations rows are `data`; and the list of releases it was asked about."""
    asked: list[str] = []

    def report_of(release: str) -> SchemaReport:
        asked.append(release)
        graph = releases[release]
        new = tuple(name for name in graph if name not in data)
        unknown = tuple(sorted(data - set(graph)))
        return SchemaReport(tuple(sorted(data)), unknown, new, (), {name: graph[name] for name in new})

    return report_of, asked


def test_the_live_release_serves_data_with_exactly_its_migrations_and_nothing_else_is_read():
    report_of, asked = world(set(BASE), {R1: BASE, R2: BASE})
    fit = choose_release(R2, [R1], report_of)
    assert (fit.release, fit.migrate) == (R2, ()) and "exactly" in fit.reason
    assert asked == [R2]


def test_data_from_before_the_live_release_s_additions_is_migrated_forward_with_it():
    live = {**BASE, "app.0003_mood": ADD, "app.0004_tag": ["CreateModel", "AddIndex", "AddConstraint"]}
    report_of, asked = world(set(BASE), {R1: BASE, R2: live})
    fit = choose_release(R2, [R1], report_of)
    assert fit.release == R2 and fit.migrate == ("app.0003_mood", "app.0004_tag")
    assert "forward-only addition" in fit.reason and "migrated forward" in fit.reason
    assert asked == [R2]  # the data's own release is not needed


@pytest.mark.parametrize(
    "operations, named",
    [
        (["RemoveField"], "app.0003_x: RemoveField"),
        (["AddField", "RunSQL"], "app.0003_x: RunSQL"),
        (["RunPython"], "app.0003_x: RunPython"),
        (["RenameField"], "app.0003_x: RenameField"),
        (["AlterField"], "app.0003_x: AlterField"),
        (["AddField", "non-atomic migration"], "app.0003_x: non-atomic migration"),
    ],
)
def test_more_than_additions_switches_to_the_release_the_data_belongs_to(operations, named):
    report_of, _ = world(set(BASE), {R1: BASE, R2: {**BASE, "app.0003_x": operations}})
    fit = choose_release(R2, [R1], report_of)
    assert (fit.release, fit.migrate) == (R1, ())
    assert named in fit.reason and f"the data belongs to {R1}" in fit.reason


def test_a_forward_migration_that_failed_switches_to_the_data_s_release():
    report_of, _ = world(set(BASE), {R1: BASE, R2: {**BASE, "app.0003_unique": ["AddConstraint"]}})
    assert choose_release(R2, [R1], report_of).release == R2
    fit = choose_release(R2, [R1], report_of, refused="IntegrityError: could not create unique index")
    assert fit.release == R1 and "failed and changed nothing (IntegrityError" in fit.reason


def test_data_with_migrations_the_live_release_lacks_goes_to_the_newest_release_that_has_them():
    newer = {**BASE, "app.0003_mood": ADD}
    report_of, asked = world(set(newer), {R1: BASE, R2: newer, R3: newer})
    fit = choose_release(R1, [R3, R2], report_of)
    assert fit.release == R3 and "lacks (app.0003_mood)" in fit.reason
    assert asked == [R1, R3]  # in the order given, stopping at the first that fits


def test_the_data_s_release_wins_over_an_older_one_that_could_migrate_it():
    mid = {**BASE, "app.0003_mood": ADD}
    report_of, _ = world(set(mid), {R1: BASE, R2: mid, R3: {**mid, "app.0004_drop": ["RemoveField"]}})
    assert choose_release(R3, [R2, R1], report_of).release == R2
    assert choose_release(R3, [R1, R2], report_of).release == R2  # an exact fit anywhere before a forward one


def test_without_an_exact_fit_a_release_adding_only_additions_is_chosen():
    # Data stopped between two migrations of one deploy (a point in time): no release has exactly its rows.
    half = {**BASE, "app.0003_mood": ADD}
    later = {**half, "app.0004_tag": ADD, "app.0005_drop": ["RemoveField"]}
    middle = {**half, "app.0004_tag": ADD}
    report_of, _ = world(set(half), {R1: BASE, R2: middle, R3: later})
    fit = choose_release(R3, [R2, R1], report_of)
    assert (fit.release, fit.migrate) == (R2, ("app.0004_tag",)) and "migrated forward" in fit.reason


def test_migrations_rollback_keep_schema_accepted_keep_the_live_release():
    newer = {**BASE, "app.0003_mood": ADD}
    report_of, asked = world(set(newer), {R1: BASE, R2: newer})
    fit = choose_release(R1, [R2], report_of, accepted=lambda r: {"app.0003_mood"} if r == R1 else ())
    assert (fit.release, fit.migrate) == (R1, ()) and "--keep-schema" in fit.reason and asked == [R1]
    assert choose_release(R1, [R2], report_of, accepted=lambda r: {"app.0009_other"}).release == R2


def test_a_verified_release_that_ran_the_data_with_keep_schema_wins_over_one_rolled_back_from():
    newer = {**BASE, "app.0003_mood": ADD}
    live = {**newer, "app.0004_check": ["AddConstraint"]}
    report_of, _ = world(set(newer), {R1: BASE, R2: newer, R3: live})
    fit = choose_release(
        R3, [R1, R2], report_of, refused="IntegrityError", accepted=lambda r: {"app.0003_mood"} if r == R1 else ()
    )
    assert fit.release == R1 and "with those `rollback --keep-schema` let it run against" in fit.reason


def test_no_release_fits_is_one_line_naming_why():
    report_of, _ = world(set(BASE) | {"app.0009_future"}, {R1: BASE, R2: {**BASE, "app.0003_x": ["RemoveField"]}})
    with pytest.raises(DeployError) as refused:
        choose_release(R2, [R1], report_of)
    message = str(refused.value)
    assert "no release fits the restored data" in message and "app.0009_future" in message and R1 in message
    assert "\n" not in message


def test_the_live_release_is_not_among_the_others_twice():
    report_of, asked = world({"app.0009_future"}, {R1: BASE})
    with pytest.raises(DeployError):
        choose_release(R1, [R1], report_of)
    assert asked == [R1]


def test_the_app_helper_reports_each_database_operation_of_a_migration():
    class Migration(migrations.Migration):
        atomic = False
        operations = [
            migrations.AddField("request", "mood", models.CharField(max_length=8, null=True)),
            migrations.SeparateDatabaseAndState(
                state_operations=[migrations.RemoveField("request", "old")],
                database_operations=[migrations.RunSQL("SELECT 1")],
            ),
        ]

    kinds = operation_kinds(Migration("0003_mood", "app"))
    assert kinds == ["AddField", "RunSQL", "non-atomic migration"]
