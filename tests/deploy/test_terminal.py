"""The operator's terminal as a remote command's input: what is typed reaches it at once, whole characters."""

from __future__ import annotations

import os

from deploy.terminal import _TerminalInput


def test_typed_bytes_are_read_at_once_and_a_character_cut_in_two_waits_for_its_other_byte():
    read_end, write_end = os.pipe()
    try:
        typed = _TerminalInput(read_end)
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
