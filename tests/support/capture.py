"""A packet capture on this machine (tcpdump) of the traffic between test containers: every packet one container
sends another is routed through this machine, so it crosses the containers' host-side links, where it is read.

Stdlib only, like tests/support/nspawn.py. .ci/setup.d/27-capture.sh installs tcpdump.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path


def missing_tools() -> str | None:
    """Why no capture can run here, or None."""
    if not shutil.which("tcpdump"):
        return "tcpdump is not installed (.ci/setup.d/27-capture.sh installs it)"
    return None


class Capture:
    """`tcpdump -i any` of the packets between `addresses` (in both directions) into `path`, while in the `with`."""

    def __init__(self, path: Path, addresses: list[str]) -> None:
        self.path = path
        hosts = " or ".join(addresses)
        self.filter = f"ip and (src host {hosts}) and (dst host {hosts})"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Capture:
        self.process = subprocess.Popen(
            ["tcpdump", "-i", "any", "-n", "-s", "0", "-U", "-w", str(self.path), self.filter],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not (self.path.exists() and self.path.stat().st_size > 0):  # tcpdump writes its header once listening
            if self.process.poll() is not None:
                raise RuntimeError(f"tcpdump exited: {self.process.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise TimeoutError("tcpdump did not start capturing in 20 s")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=30)

    def wait_for(self, needle: bytes, timeout: float = 20) -> bool:
        """Whether `needle` is in the capture file within `timeout` s (tcpdump writes each packet once it read it)."""
        deadline = time.monotonic() + timeout
        while needle not in self.path.read_bytes():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def data(self) -> bytes:
        """Every byte captured (headers and payloads)."""
        return self.path.read_bytes()

    def packets(self, expression: str) -> int:
        """How many captured packets match a tcpdump filter `expression`."""
        result = subprocess.run(
            ["tcpdump", "-n", "-r", str(self.path), expression], capture_output=True, text=True, check=True
        )
        return len(result.stdout.splitlines())
