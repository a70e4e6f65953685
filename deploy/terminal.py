"""Text from a server made inert before it reaches the operator's terminal: no escape sequences, no control codes."""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import sys
import termios
import tty
from collections.abc import Callable, Iterator

from invoke.runners import Local

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC strings, two-character escapes; then any control
# code left (a sequence cut between two chunks of a stream loses its ESC here), but newline and tab.
_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*(?:\x1b\\)?|\x1b."
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` without terminal escape sequences and control characters (CRLF becomes LF)."""
    return _CONTROL.sub("", _SEQUENCE.sub("", text.replace("\r\n", "\n")))


class WholeCharacters:
    """For an invoke Runner: each output stream decoded as one text, so a character whose bytes two reads split
    comes out whole, printed and captured (result.stdout, result.stderr).

    NOTE: invoke's Runner.read_proc_output decodes each read (up to read_chunk_size, 1000 bytes) on its own with
    errors="replace": a character of several bytes cut between two reads became U+FFFD twice.
    """

    def read_proc_output(self, reader: Callable) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder(self.encoding)("replace")  # one per stream: each has its own thread
        while data := reader(self.read_chunk_size):
            if text := decoder.decode(data):
                yield text
        if text := decoder.decode(b"", final=True):  # the bytes of a character the stream never finished
            yield text


class LocalRunner(WholeCharacters, Local):
    """invoke's Local runner, its output decoded whole characters."""


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


# NOTE: invoke reads an in_stream that is no terminal one byte per loop of 10 ms (`bytes_to_read` answers 1, then
# `input_sleep`; pyinvoke/invoke#774): a 1 KB script piped to `fab shell` took 10 s to reach the server.
_READ_SIZE = 65536


class _Input:
    """The operator's stdin (a terminal, a pipe, a file) as invoke's in_stream: what is there, up to 64 KiB, read at
    once and decoded as UTF-8 without waiting for more (a character cut between two reads waits for its other bytes;
    `None`: nothing yet, "": the end)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def read(self, size: int) -> str | None:
        data = os.read(self.fd, max(size, _READ_SIZE))
        if not data:
            return ""
        return self._decoder.decode(data) or None


def stdin_input():
    """sys.stdin as invoke's in_stream for a command without a terminal of its own: read as it comes, not a byte
    per 10 ms (sys.stdin itself when it has no file descriptor)."""
    try:
        return _Input(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        return sys.stdin


@contextlib.contextmanager
def remote_terminal() -> Iterator[_Input]:
    """The local terminal in raw mode for a command on a remote pty, as `ssh -t` leaves it: what is typed goes
    to the remote terminal unchanged (Ctrl-C, Ctrl-Z and Ctrl-D included: they reach the command, not fab), and
    its output is shown as the remote terminal wrote it. Restored on the way out.

    NOTE: invoke reads `sys.stdin` (a text stream) with read(n) where n counts bytes, and only sets cbreak: a
    character of several bytes blocks that read until more is typed, and the local terminal keeps translating
    newlines and turning Ctrl-C into a signal to fab itself.
    """
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    sys.stdout.flush()
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield _Input(fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
