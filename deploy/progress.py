"""Deploy progress: each step printed with its duration, and a summary at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Progress:
    """Times the steps of one command; `heartbeat` runs before each step (it refreshes the deploy lock)."""

    title: str
    out: TextIO = sys.stdout
    heartbeat: Callable[[], None] | None = None
    steps: list[tuple[str, float, bool]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.heartbeat:
            self.heartbeat()
        self.say(f"-> {name}")
        begun = time.monotonic()
        try:
            yield
        except BaseException:
            self.record(name, time.monotonic() - begun, ok=False)
            raise
        self.record(name, time.monotonic() - begun)

    def record(self, name: str, seconds: float, ok: bool = True) -> None:
        self.steps.append((name, seconds, ok))
        self.say(f"   {'ok' if ok else 'FAILED'}  {name} ({seconds:.1f} s)")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self, outcome: str) -> str:
        lines = [f"{self.title}: {outcome} in {self.elapsed:.1f} s"]
        lines += [f"  {'  ' if ok else '! '}{seconds:6.1f} s  {name}" for name, seconds, ok in self.steps]
        return "\n".join(lines)
