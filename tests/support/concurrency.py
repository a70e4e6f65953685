"""Run one function in several threads at once, as concurrent requests or task runs would."""

import threading
from collections.abc import Callable

from django.db import connection


def run_in_threads(body: Callable[[], None], count: int) -> list[BaseException]:
    """Start `count` threads of `body` together and wait for them; return what they raised.

    Each thread has its own database connection, closed when it ends.
    """
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start.wait()
            body()
        except Exception as exc:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
