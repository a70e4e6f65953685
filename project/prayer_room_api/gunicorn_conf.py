"""gunicorn hooks for `manage.py prodserver web`, loaded through its `config` ARG."""

import gc


def on_starting(server):
    """Before the master binds its port: load the WSGI application and the URLconf (every view, serializer and DRF
    module), then freeze what it imported.

    NOTE: nginx sends a request to a port as soon as something listens there. Loaded lazily, these imports ran in a
    new worker after the port was bound, and during a rolling restart the requests nginx had sent to the restarting
    port waited for them (and for a full garbage collection): the first answer took 0.29 to 0.57 s after the bind on
    a machine at load 4 (2 cores), 0.06 to 0.12 s with this hook. Ten times that on a busier machine is the likely
    cause of the one POST of the cluster deploy test that once timed out (5 s) on Debian 13.

    The garbage collector writes to every tracked object it visits, which un-shares the copy-on-write pages of a
    forked worker; frozen objects are never visited.
    """
    from django.urls import get_resolver

    import prayer_room_api.wsgi  # noqa: F401 - the application gunicorn's workers load: imported once, here

    get_resolver().url_patterns  # noqa: B018 - imports the URLconf and every view module
    gc.collect()
    gc.freeze()
