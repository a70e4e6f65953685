"""The operator's terminal or pipe as a remote command's input: what is there reaches it at once, whole
characters."""

from __future__ import annotations

import os
import threading
import time

import invoke

from deploy.terminal import _Input


def test_typed_bytes_are_read_at_once_and_a_character_cut_in_two_waits_for_its_other_byte():
    read_end, write_end = os.pipe()
    try:
        typed = _Input(read_end)
        os.write(write_end, b"jos" + "é".encode()[:1])
        assert typed.read(4) == "jos"  # what is there, not blocking for a 4th character
        os.write(write_end, "é".encode()[1:] + b"\r")
        assert typed.read(2) == "é\r"
        os.write(write_end, "é".encode()[:1])
        assert typed.read(1) is None  # half a character: nothing to send yet (None is "not ready", "" is EOF)
        os.close(write_end)
        write_end = -1
        assert typed.read(1) == ""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def piped(data: bytes):
    """The read end of a pipe that a thread fills with `data`, then closes (a script piped to fab)."""
    read_end, write_end = os.pipe()

    def write() -> None:
        with os.fdopen(write_end, "wb") as stream:
            stream.write(data)

    threading.Thread(target=write, daemon=True).start()
    return read_end


def test_a_piped_script_reaches_the_command_whole_in_chunks_not_a_byte_per_10_ms(tmp_path):
    """invoke's own stdin thread (the Local runner shares it with Fabric's Remote) copies the pipe into `cat`, which
    writes a file (invoke decodes a command's output chunk by chunk: a character cut there is its own matter)."""
    received = tmp_path / "received"
    script = ("print('prière', 6 * 7)  # é\n" * 8000).encode()  # 240 KB: four reads or more
    read_end = piped(script)
    started = time.monotonic()
    invoke.Context().run(f"cat > {received}", in_stream=_Input(read_end), hide=True)
    seconds = time.monotonic() - started
    os.close(read_end)
    assert received.read_bytes() == script
    assert seconds < 3, seconds

    # The control: the pipe as a text stream, as sys.stdin is, goes one byte per loop of 10 ms.
    small = b"print(6 * 7)\n" * 12  # 156 bytes
    with os.fdopen(piped(small), "r") as stream:
        started = time.monotonic()
        invoke.Context().run(f"cat > {received}", in_stream=stream, hide=True)
        seconds = time.monotonic() - started
    assert received.read_bytes() == small and seconds >= 1.5, seconds
