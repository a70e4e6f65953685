"""The deploy lock on the server: a directory made atomically by mkdir, naming who holds it and since when."""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from dataclasses import dataclass

from deploy.errors import DeployError
from deploy.remote import Server, sh


def holder_name() -> str:
    """Who is deploying: local user@machine."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass(frozen=True)
class DeployLock:
    """Held for one deploy or rollback; refreshed at each step, stale after config.lock_expiry_seconds without one."""

    server: Server
    action: str

    @property
    def path(self):
        return self.server.config.layout.lock

    def acquire(self) -> None:
        """Take the lock, breaking it only when stale; otherwise say who holds it and since when."""
        owner = json.dumps(
            {"holder": holder_name(), "pid": os.getpid(), "since": int(time.time()), "action": self.action}
        )
        take = f"mkdir {sh(self.path)} 2>/dev/null && printf %s {sh(owner)} > {sh(self.path / 'owner')}"
        for _attempt in range(2):
            if self.server.root(take, what="taking the deploy lock", warn=True).exited == 0:
                return
            held = self.holder()
            if held is None:
                continue  # released between our mkdir and our look
            age = held["idle"]
            if age <= self.server.config.lock_expiry_seconds:
                raise DeployError(
                    f"{self.server.name} is locked by {held.get('holder', '?')} ({held.get('action', '?')}) since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.get('since', 0)))} "
                    f"(last step {age} s ago); wait for it, or run `fab unlock` if that deploy is dead."
                )
            print(f"  breaking a stale deploy lock of {held.get('holder', '?')} (idle {age} s)")
            self.break_lock()
        raise DeployError(f"{self.server.name}: could not take the deploy lock at {self.path}; try again.")

    def holder(self) -> dict | None:
        """The lock's owner record plus `idle` seconds since its last refresh, or None when unlocked."""
        owner = self.path / "owner"
        probe = f"cat {sh(owner)} && echo && stat -c %Y {sh(owner)} && date +%s"
        result = self.server.root(probe, what="reading the deploy lock", warn=True)
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
        self.server.root(sh("touch", self.path / "owner"), what="refreshing the deploy lock", warn=True)

    def kept_alive(self, command: str) -> str:
        """`command` (a root shell command) with the lock refreshed every 20 s while it runs.

        A long step (a virtualenv build, a long migration) cannot outlive the lock's expiry this way.
        """
        owner = sh(self.path / "owner")
        keeper = f"( while sleep 20; do touch {owner}; done ) </dev/null >/dev/null 2>&1 & keeper=$!"
        return f"{keeper}; {command}; code=$?; kill $keeper; exit $code"

    def release(self) -> None:
        self.server.root(sh("rm", "-rf", self.path), what="releasing the deploy lock", warn=True)

    def break_lock(self) -> None:
        self.release()
