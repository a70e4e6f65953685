"""The operator's terminal or pipe as a remote command's input: what is there reaches it at once, whole
characters; a command's output printed and captured whole characters however the reads cut it."""

from __future__ import annotations

import io
import os
import shlex
import sys
import threading
import time

import invoke
from fabric import Connection
from fabric.runners import Remote

from deploy.ssh import RemoteRunner
from deploy.terminal import LocalRunner, _InertStream, _Input


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


TEXT = "é€🙏" * 5000  # 9 bytes a repeat: 1000-byte reads cut characters


def run_locally(runner_class, code: str):
    """Run Python `code` through invoke's Context with `runner_class` as its local runner; the result and what it
    printed on stdout and stderr."""
    context = invoke.Context(invoke.Config(overrides={"runners": {"local": runner_class}}))
    out, err = io.StringIO(), io.StringIO()
    result = context.run(shlex.join([sys.executable, "-c", code]), out_stream=out, err_stream=err, in_stream=False)
    return result, out.getvalue(), err.getvalue()


def test_a_local_command_s_output_comes_out_whole_characters_printed_and_captured():
    code = f"import sys; print({TEXT!r}); print({TEXT[::-1]!r}, file=sys.stderr)"
    result, out, err = run_locally(LocalRunner, code)
    assert result.stdout == out == TEXT + "\n"
    assert result.stderr == err == TEXT[::-1] + "\n"
    stock, out, err = run_locally(invoke.Local, code)  # positive control: invoke decodes each 1000-byte read alone
    assert "\ufffd" in stock.stdout and "\ufffd" in out and "\ufffd" in stock.stderr and "\ufffd" in err


class Channel:
    """A paramiko channel's reading side that hands out fixed chunks of bytes, then the end."""

    def __init__(self, stdout: list[bytes], stderr: list[bytes]) -> None:
        self.chunks = {"out": list(stdout), "err": list(stderr)}

    def recv(self, size: int) -> bytes:
        return self.chunks["out"].pop(0) if self.chunks["out"] else b""

    def recv_stderr(self, size: int) -> bytes:
        return self.chunks["err"].pop(0) if self.chunks["err"] else b""


def read_remote(runner_class, stdout: list[bytes], stderr: list[bytes]) -> tuple[str, str, str, str]:
    """What invoke's stdout and stderr threads of a Fabric runner print and capture from a channel's chunks."""
    runner = runner_class(context=Connection("server.invalid"))
    runner.encoding = "utf-8"  # what run() sets from the `encoding` option (the locale's, here UTF-8)
    runner.channel = Channel(stdout, stderr)
    printed = {"out": io.StringIO(), "err": io.StringIO()}
    captured: dict[str, list[str]] = {"out": [], "err": []}
    runner.handle_stdout(buffer_=captured["out"], hide=False, output=printed["out"])
    runner.handle_stderr(buffer_=captured["err"], hide=False, output=printed["err"])
    return printed["out"].getvalue(), "".join(captured["out"]), printed["err"].getvalue(), "".join(captured["err"])


def test_a_server_command_s_output_comes_out_whole_characters_printed_and_captured():
    data = "prière 祈り 🙏".encode()
    cuts = [data[:6], data[6:8], data[8:11], data[11:12], data[12:16], data[16:]]  # inside é, 祈, り and 🙏
    assert b"".join(cuts) == data and all(cut for cut in cuts)
    expected = "prière 祈り 🙏"
    assert read_remote(RemoteRunner, cuts, cuts) == (expected,) * 4
    stock = read_remote(Remote, cuts, cuts)  # positive control: Fabric's own runner decodes each read alone
    assert all("\ufffd" in text and text != expected for text in stock)


def test_a_character_a_stream_never_finishes_is_one_replacement_character():
    printed, captured, _, _ = read_remote(RemoteRunner, [b"ok ", "é".encode()[:1]], [])
    assert printed == captured == "ok \ufffd"


def test_server_text_made_printable_keeps_a_character_cut_between_reads_whole():
    data = "\x1b[31mprière\x1b[0m\r\n".encode()
    cuts = [data[:9], data[9:]]  # inside è
    printed = io.StringIO()
    runner = RemoteRunner(context=Connection("server.invalid"))
    runner.encoding = "utf-8"
    runner.channel = Channel(cuts, [])
    runner.handle_stdout(buffer_=[], hide=False, output=_InertStream(printed))
    assert printed.getvalue() == "prière\n"
