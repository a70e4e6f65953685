"""Deploy progress: each step printed with its duration, and a summary at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Outcome:
    """What a step may report beyond success: whether it changed the server, and a short note."""

    changed: bool | None = None
    note: str = ""


@dataclass(frozen=True)
class StepRecord:
    name: str
    seconds: float
    ok: bool = True
    changed: bool | None = None
    note: str = ""


@dataclass
class Progress:
    """Times the steps of one command; `heartbeat` runs before each step (it refreshes the deploy lock)."""

    title: str
    out: TextIO = sys.stdout
    prefix: str = ""  # before every line: the host, when several hosts report at once
    heartbeat: Callable[[], None] | None = None
    steps: list[StepRecord] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        if self.prefix:
            text = "\n".join(f"{self.prefix}{line}" for line in text.splitlines())
        print(text, file=self.out, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[Outcome]:
        """Time the block as step `name`; it may set the yielded Outcome's `changed` and `note`."""
        if self.heartbeat:
            self.heartbeat()
        self.say(f"-> {name}")
        begun = time.monotonic()
        outcome = Outcome()
        try:
            yield outcome
        except BaseException:
            self.record(name, time.monotonic() - begun, ok=False)
            raise
        self.record(name, time.monotonic() - begun, changed=outcome.changed, note=outcome.note)

    def record(self, name: str, seconds: float, ok: bool = True, changed: bool | None = None, note: str = "") -> None:
        self.steps.append(StepRecord(name, seconds, ok, changed, note))
        label = "FAILED" if not ok else "changed" if changed else "ok"
        self.say(f"   {label}  {name} ({seconds:.1f} s){f': {note}' if note else ''}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self, outcome: str) -> str:
        lines = [f"{self.title}: {outcome} in {self.elapsed:.1f} s"]
        lines += [f"  {'  ' if step.ok else '! '}{step.seconds:6.1f} s  {step.name}" for step in self.steps]
        return "\n".join(lines)
