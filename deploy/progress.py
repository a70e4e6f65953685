"""Deploy progress: each step printed with its duration, and a summary at the end; several hosts' work run at once,
each one's lines behind its name."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

from deploy.errors import DeployError

T = TypeVar("T")
R = TypeVar("R")


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
    heartbeat: Callable[[], None] | None = None
    steps: list[StepRecord] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
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


class PrefixedLines:
    """A text stream that writes each whole line to `out` behind `prefix`, one host's lines never split by
    another's (the lock is shared by every host's stream)."""

    def __init__(self, prefix: str, out: TextIO, lock: threading.Lock) -> None:
        self.prefix, self.out, self.lock, self.pending = prefix, out, lock, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:
            with self.lock:
                self.out.write("".join(f"{self.prefix}{line}\n" for line in lines))
                self.out.flush()
        return len(text)

    def flush(self) -> None:
        pass


def in_parallel(action: Callable[[T], R], items: Sequence[T], name: Callable[[T], str]) -> list[R]:
    """`action` on every item at once (a thread each); when any fails, all are waited for, then one DeployError
    names each failure."""
    if len(items) <= 1:
        return [action(item) for item in items]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = [pool.submit(action, item) for item in items]
        errors = []
        for item, future in zip(items, futures, strict=True):
            try:
                future.result()
            except DeployError as exc:
                errors.append(f"{name(item)}: {exc}")
            except Exception as exc:  # noqa: BLE001 - reported with the others, then raised as one
                errors.append(f"{name(item)}: {type(exc).__name__}: {exc}")
    if errors:
        raise DeployError(" | ".join(errors))
    return [future.result() for future in futures]
