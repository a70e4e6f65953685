"""The deploy lock's command lines: every change runs under flock(1) on a guard file beside the lock directory."""

from __future__ import annotations

from pathlib import PurePosixPath

from deploy.commands import sh

GUARD_WAIT = 30  # seconds flock waits for another lock operation


def guarded(lock: PurePosixPath, script: str) -> str:
    """A root shell command running `script` while holding the guard's flock."""
    return sh("flock", "-w", str(GUARD_WAIT), lock.parent / f".{lock.name}.guard", "sh", "-c", script)


def ours(lock: PurePosixPath, token: str) -> str:
    """Shell test: the lock's owner record carries `token`."""
    return f"grep -qF {sh(token)} {sh(lock / 'owner')} 2>/dev/null"


def acquire(lock: PurePosixPath, owner: str, expiry: float) -> str:
    """Take the lock with the `owner` record: exit 0; idle longer than `expiry` seconds: break and retake it, exit
    10; held: exit 1. Unless it was free, prints the idle seconds and the holder's record."""
    path, record = sh(lock), sh(lock / "owner")
    take = f"mkdir {path} && printf %s {sh(owner)} > {record}"
    return guarded(
        lock,
        f"if mkdir {path} 2>/dev/null; then printf %s {sh(owner)} > {record}; exit 0; fi; "
        f"idle=$(( $(date +%s) - $(stat -c %Y {record} 2>/dev/null || echo 0) )); "
        f'printf "%s " "$idle"; cat {record} 2>/dev/null; echo; '
        f'if [ "$idle" -gt {int(expiry)} ]; then '
        f"rm -rf {path} && {take} && exit 10; exit 2; fi; exit 1",
    )


def holder(lock: PurePosixPath) -> str:
    """The owner record, then its mtime and the clock (epoch seconds), one per line; fails when there is none."""
    owner = lock / "owner"
    return f"cat {sh(owner)} && echo && stat -c %Y {sh(owner)} && date +%s"


def refresh(lock: PurePosixPath, token: str) -> str:
    """Mark a step: touch the owner record only when the lock is ours (exit 1 otherwise)."""
    return guarded(lock, f"{ours(lock, token)} && touch {sh(lock / 'owner')}")


def release(lock: PurePosixPath, token: str) -> str:
    """Remove the lock if it is still ours (a lock broken as stale and retaken belongs to someone else)."""
    return guarded(lock, f"if {ours(lock, token)}; then rm -rf {sh(lock)}; fi")


def break_lock(lock: PurePosixPath) -> str:
    """Remove the lock whoever holds it."""
    return guarded(lock, f"rm -rf {sh(lock)}")
