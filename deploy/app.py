"""The app-specific parts the deploy kit needs, named in one place: settings, the ping task, beat's leader lock, and
the write smoke test.

The kit reads the names; the app helper (deploy/on_server/app_helper.py) has this text inlined and runs the two
functions inside the release's Django on the server.
NOTE: no `from __future__` and no module-level import of the project: this text runs inside the app helper's script.
"""

SETTINGS_MODULE = "prayer_room_api.settings.production"
LOCAL_SETTINGS_MODULE = "prayer_room_api.settings.local"
# A task answering {"release": ..., "hostname": ...}: a deploy checks a worker of the new release runs it.
PING_TASK = "prayer_room_api.tasks.ping"
# The prefix of every Redis key and channel of the app (the settings' REDIS_KEY_PREFIX: the broker's, the results', the
# cache's): the app's Redis ACL user may touch nothing else, and the deploy's ping task is sent under it.
REDIS_KEY_PREFIX = "prayer-room:"
# A release's settings file, and the line it holds when its code names every Redis key under REDIS_KEY_PREFIX: a
# release without it predates the prefix (the app's Redis ACL user would refuse its programs): rollback refuses it.
REDIS_PREFIX_SETTINGS = "project/prayer_room_api/settings/base.py"
REDIS_PREFIX_LINE = f'REDIS_KEY_PREFIX = "{REDIS_KEY_PREFIX}"'
# beat's scheduler with a leader lock (a release before it ran django_celery_beat's DatabaseScheduler).
LEADER_SCHEDULER = "prayer_room_api.beat.LeaderDatabaseScheduler"


def beat_leaders(cursor) -> list:
    """The beats holding the leader lock now, as (session name, address) rows."""
    from prayer_room_api.beat import leaders

    return leaders(cursor)


def write_smoke_test() -> None:
    """The public write path: a prayer request through the API's serializer (the caller rolls it back)."""
    from prayer_room_api.api.serializers import SubmitRequestSerializer
    from prayer_room_api.models import Location

    location = Location.objects.filter(is_active=True).first() or Location.objects.create(
        name="deploy smoke test", slug="deploy-smoke-test"
    )
    serializer = SubmitRequestSerializer(
        data={"type": "prayer", "content": "deploy smoke test", "location": location.slug}
    )
    serializer.is_valid(raise_exception=True)
    serializer.save()
