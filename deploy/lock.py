"""The deploy lock on the server: a directory naming who holds it (with an owner token) and since when.

Every change to it runs under flock(1) on a guard file beside it, so checking the owner and acting
on it is one step: refresh and release touch only the lock whose token is ours, and a stale lock is
broken and retaken in one go (two deploys breaking the same stale lock: one gets it).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from deploy.commands import lock as lock_commands
from deploy.commands import sh
from deploy.errors import DeployError
from deploy.ssh import Server


def holder_name() -> str:
    """Who is deploying: local user@machine."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass(frozen=True)
class DeployLock:
    """Held for one deploy, rollback, restore or restart; refreshed while it runs (deploy.site's heartbeat), stale
    after config.lock_expiry_seconds without a refresh."""

    server: Server
    action: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def path(self):
        return self.server.config.layout.lock

    def acquire(self) -> None:
        """Take the lock, breaking it only when stale; otherwise say who holds it and since when."""
        owner = json.dumps(
            {
                "holder": holder_name(),
                "pid": os.getpid(),
                "since": int(time.time()),
                "action": self.action,
                "token": self.token,
            }
        )
        script = lock_commands.acquire(self.path, owner, self.server.config.lock_expiry_seconds)
        result = self.server.root(script, what="taking the deploy lock", warn=True)
        if result.exited == 0:
            return
        idle, held = _parse_held(result.stdout)
        if result.exited == 10:
            print(f"  breaking a stale deploy lock of {held.get('holder', '?')} (idle {idle} s)")
            return
        if result.exited == 1:
            raise DeployError(
                f"{self.server.name} is locked by {held.get('holder', '?')} ({held.get('action', '?')}) since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.get('since', 0)))} "
                f"(last step {idle} s ago); wait for it, or run `fab unlock` if that deploy is dead."
            )
        raise DeployError(
            f"{self.server.name}: could not take the deploy lock at {self.path} "
            f"({(result.stderr or result.stdout).strip()[-300:] or f'exit {result.exited}'}); try again."
        )

    def holder(self) -> dict | None:
        """The lock's owner record plus `idle` seconds since its last refresh, or None when unlocked."""
        result = self.server.root(lock_commands.holder(self.path), what="reading the deploy lock", warn=True)
        if result.exited != 0:
            exists = self.server.root(sh("test", "-d", self.path), what="reading the deploy lock", warn=True)
            return {"holder": "unknown", "since": 0, "idle": 10**9} if exists.exited == 0 else None
        lines = result.stdout.strip().splitlines()
        try:
            record = json.loads(lines[0])
            record["idle"] = int(lines[-1]) - int(lines[-2])
        except (ValueError, IndexError):
            record = {"holder": "unknown", "since": 0, "idle": 10**9}
        return record

    def refresh(self) -> None:
        """Mark a step: only our own lock; one broken as stale and taken by another deploy stops this one."""
        touch = lock_commands.refresh(self.path, self.token)
        if self.server.root(touch, what="refreshing the deploy lock", warn=True).exited == 0:
            return
        held = self.holder()
        who = f"{held.get('holder', '?')} ({held.get('action', '?')})" if held else "nobody"
        raise DeployError(
            f"{self.server.name}: this {self.action} lost the deploy lock (it went stale and is now held by {who}); "
            "stopping. Check `fab status` before deploying again."
        )

    def release(self) -> None:
        """Remove the lock if it is still ours (a lock broken as stale and retaken belongs to someone else)."""
        self.server.root(lock_commands.release(self.path, self.token), what="releasing the deploy lock", warn=True)

    def break_lock(self) -> None:
        """Remove the lock whoever holds it (`fab unlock`)."""
        self.server.root(lock_commands.break_lock(self.path), what="breaking the deploy lock", warn=True)

    @contextmanager
    def held(self) -> Iterator[DeployLock]:
        """Hold the lock for a block; released on the way out, whatever happened."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()


def _parse_held(stdout: str) -> tuple[int, dict]:
    """`IDLE OWNER-JSON` as the acquire script prints it; an unreadable owner is reported as unknown."""
    idle, _, record = stdout.strip().partition(" ")
    try:
        held = json.loads(record)
    except ValueError:
        held = {"holder": "unknown"}
    try:
        return int(idle), held
    except ValueError:
        return 10**9, held
