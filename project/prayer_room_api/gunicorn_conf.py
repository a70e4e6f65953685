"""gunicorn hooks for `manage.py prodserver web`, loaded through its `config` ARG."""

import gc


def when_ready(server):
    """Freeze what the master imported, so forked workers share those pages instead of copying them.

    NOTE: the garbage collector writes to every tracked object it visits, which un-shares the
    copy-on-write pages of a forked worker; frozen objects are never visited.
    """
    gc.collect()
    gc.freeze()
