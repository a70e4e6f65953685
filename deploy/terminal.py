"""Text from a server made inert before it reaches the operator's terminal: no escape sequences, no control codes."""

from __future__ import annotations

import contextlib
import re
import sys

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC strings, two-character escapes; then any control
# code left (a sequence cut between two chunks of a stream loses its ESC here), but newline and tab.
_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*(?:\x1b\\)?|\x1b."
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` without terminal escape sequences and control characters (CRLF becomes LF)."""
    return _CONTROL.sub("", _SEQUENCE.sub("", text.replace("\r\n", "\n")))


class _InertStream:
    """A text stream that writes only `printable` text to the one it wraps."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable(text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def inert_stdout():
    """Within the block, what is printed to stdout (a server's status, its logs streamed) is `printable`."""
    stream = sys.stdout
    sys.stdout = _InertStream(stream)
    try:
        yield
    finally:
        sys.stdout = stream
