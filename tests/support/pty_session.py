"""A command run on a pseudo-terminal, driven as an operator types at it: wait for text, type a line, a key."""

from __future__ import annotations

import os
import pty
import select
import time


class PtySession:
    """`argv` started on a new pty (its controlling terminal, stdin and stdout); `expect` reads until a text
    appears, `send` types. Everything read is kept in `seen`."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            try:
                if cwd:
                    os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.seen = b""
        self._unread = b""
        self.exit_code: int | None = None

    def expect(self, text: str, timeout: float = 60) -> str:
        """What was read up to and including `text`; fails with the tail of the output after `timeout` or at EOF."""
        wanted = text.encode()
        deadline = time.monotonic() + timeout
        while wanted not in self._unread:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} in {timeout} s; the terminal shows: {self._unread[-800:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the command ended before {text!r}: {self._unread[-800:]!r}")
                self._unread += chunk
                self.seen += chunk
        end = self._unread.index(wanted) + len(wanted)
        before, self._unread = self._unread[:end], self._unread[end:]
        return before.decode(errors="replace")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def line(self, text: str) -> None:
        """Type `text` and Enter (a terminal sends CR)."""
        self.send(text + "\r")

    def wait(self, timeout: float = 60) -> int:
        """The exit code, reading (and keeping) the output meanwhile so the child never blocks on a full pty."""
        deadline = time.monotonic() + timeout
        while self.exit_code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"still running after {timeout} s: {self._unread[-800:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            chunk = b""
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal; it is exiting
                    pass
            if ready and not chunk:
                time.sleep(0.05)
            self._unread += chunk
            self.seen += chunk
        os.close(self.fd)
        return self.exit_code

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
