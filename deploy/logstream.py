"""A supervisord event listener for `invoke dev`: every program's output on the terminal, one line at a time,
prefixed with the program's name (as honcho and foreman show a Procfile's processes).

supervisord sends each chunk a program writes as a PROCESS_LOG event (its log files still get everything),
and each change of a program's state as a PROCESS_STATE event; this listener writes whole lines to its
stderr, which the config sends to supervisord's own stdout.
Stdlib only: supervisord runs it as a plain script, `python deploy/logstream.py [--color]`.
"""

from __future__ import annotations

import io
import os
import sys
from typing import BinaryIO, TextIO

COLORS = (36, 33, 32, 35, 34, 31)  # cyan, yellow, green, magenta, blue, red
WIDTH = 7  # "web-1", "worker", "beat" line up
SHOWN_STATES = {"RUNNING", "BACKOFF", "EXITED", "FATAL", "STOPPED"}


class Prefixer:
    """Turns chunks of output into whole lines prefixed with the name of the program that wrote them."""

    def __init__(self, out: BinaryIO, color: bool = False, width: int = WIDTH):
        self.out, self.color, self.width = out, color, width
        self.partial: dict[str, bytes] = {}
        self.colors: dict[str, int] = {}

    def prefix(self, name: str) -> bytes:
        label = f"{name:<{self.width}} |"
        if self.color:
            code = self.colors.setdefault(name, COLORS[len(self.colors) % len(COLORS)])
            label = f"\033[{code}m{label}\033[0m"
        return label.encode() + b" "

    def feed(self, name: str, data: bytes) -> None:
        lines = (self.partial.pop(name, b"") + data).split(b"\n")
        rest = lines.pop()
        if len(rest) > 65536:  # no newline for that long: show it anyway
            lines.append(rest)
            rest = b""
        if rest:
            self.partial[name] = rest
        for line in lines:
            self.out.write(self.prefix(name) + line.rstrip(b"\r") + b"\n")
        self.out.flush()


def listen(stdin: TextIO, stdout: TextIO, prefixer: Prefixer) -> None:
    """supervisord's event listener protocol. NOTE: `len` counts the payload's characters, not its bytes."""
    while True:
        stdout.write("READY\n")
        stdout.flush()
        header = stdin.readline()
        if not header:
            return  # supervisord went away
        fields = dict(word.split(":", 1) for word in header.split())
        payload = stdin.read(int(fields["len"]))
        meta, _, data = payload.partition("\n")
        process = dict(word.split(":", 1) for word in meta.split() if ":" in word)
        if fields["eventname"].startswith("PROCESS_LOG"):
            prefixer.feed(process["processname"], data.encode("utf-8", "surrogateescape"))
        elif fields["eventname"].startswith("PROCESS_STATE_"):
            state = fields["eventname"].removeprefix("PROCESS_STATE_")
            if state in SHOWN_STATES and process.get("processname") != os.environ.get("SUPERVISOR_PROCESS_NAME"):
                pid = f" (pid {process['pid']})" if "pid" in process else ""
                prefixer.feed(process["processname"], f"[supervisord] {state.lower()}{pid}\n".encode())
        stdout.write("RESULT 2\nOK")
        stdout.flush()


def main(argv: list[str]) -> None:
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8")
    listen(stdin, stdout, Prefixer(sys.stderr.buffer, color="--color" in argv))


if __name__ == "__main__":
    main(sys.argv[1:])
