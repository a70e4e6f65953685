"""Who runs a command: root (directly or through sudo), the app user, or the build user."""

from __future__ import annotations

from deploy.commands import sh


def as_root(command: str, *, is_root: bool, sudo_password: bool) -> str:
    """`command` for the login to run as root: as it is for root, through `sudo -n` otherwise (with a sudo
    password, Fabric's sudo runs the `sh -c` returned here)."""
    if is_root:
        return command
    if sudo_password:
        return sh("sh", "-c", command)
    return sh("sudo", "-n", "sh", "-c", command)


def as_app(command: str, user: str, home: str) -> str:
    """A root shell command that runs `command` as the app user, with its HOME and USER."""
    return sh("runuser", "-u", user, "--", "env", f"HOME={home}", f"USER={user}", "sh", "-c", command)


def as_build(command: str, build_user: str, app_user: str) -> str:
    """A root shell command that runs `command` (umask 022) as the build user, with the app user's group added so
    that it reads the env file."""
    return sh(
        "runuser", "-u", build_user, "-g", build_user, "-G", app_user, "--",
        "env", "HOME=/nonexistent", f"USER={build_user}", "sh", "-c", f"umask 022 && {command}",
    )  # fmt: skip
