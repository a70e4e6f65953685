"""One SSH session to a server: connect with clear errors, run as root or as the app user, upload files."""

from __future__ import annotations

import io
import json
import socket
from dataclasses import dataclass

import paramiko
from fabric import Connection
from fabric.runners import Remote
from invoke.exceptions import Failure, UnexpectedExit

from deploy import hostkeys, terminal
from deploy.commands import sh, supervisor, users
from deploy.commands.helpers import app_helper
from deploy.config import DeployConfig
from deploy.errors import DeployError

__all__ = ["RemoteRunner", "Server", "connect", "sh"]


class RemoteRunner(terminal.WholeCharacters, Remote):
    """Fabric's runner, each output stream of a server's command decoded whole characters."""


@dataclass(frozen=True)
class Server:
    """A checked connection: who we are on the host and how to become root and the app user."""

    conn: Connection
    config: DeployConfig
    is_root: bool
    sudo_password: bool
    app_home: str

    @property
    def name(self) -> str:
        return f"{self.conn.user}@{self.conn.host}" + (f":{self.conn.port}" if self.conn.port != 22 else "")

    def root(self, command: str, *, what: str, warn: bool = False, timeout: float | None = None, **kwargs):
        """Run a shell command as root; a failure raises DeployError naming `what` (unless warn)."""
        runner = self.conn.sudo if self.sudo_password and not self.is_root else self.conn.run
        command = users.as_root(command, is_root=self.is_root, sudo_password=self.sudo_password)
        return self._run(runner, command, what=what, warn=warn, timeout=timeout, **kwargs)

    def as_app(self, command: str) -> str:
        """A root shell command that runs `command` as the app user, with its HOME and USER."""
        return users.as_app(command, self.config.user, self.app_home)

    def as_build(self, command: str) -> str:
        """A root shell command that runs `command` (umask 022) as the build user, with the app user's group
        added so that it reads the env file."""
        return users.as_build(command, self.config.build_user, self.config.user)

    def app(self, command: str, *, what: str, warn: bool = False, timeout: float | None = None, **kwargs):
        """Run a shell command as the app user."""
        return self.root(self.as_app(command), what=what, warn=warn, timeout=timeout, **kwargs)

    def _run(self, runner, command: str, *, what: str, warn: bool, **kwargs):
        kwargs.setdefault("hide", True)
        kwargs.setdefault("in_stream", False)
        try:
            result = runner(command, warn=True, **kwargs)
        except (Failure, OSError, paramiko.SSHException) as exc:
            raise DeployError(f"{what} on {self.name}: {exc}") from exc
        if kwargs.get("asynchronous"):
            return result
        if result.exited != 0 and not warn:
            detail = (result.stderr.strip() or result.stdout.strip())[-1500:]
            raise DeployError(f"{what} failed on {self.name} (exit {result.exited}): {detail}")
        return result

    def read(self, path: object, *, what: str) -> str | None:
        """A root-readable file's text, or None when it does not exist."""
        result = self.root(sh("cat", path), what=what, warn=True)
        return result.stdout if result.exited == 0 else None

    def upload(self, files: list[tuple[bytes | str, object, str, str]], *, then: str = "true", what: str) -> None:
        """Put each (data, dest, owner, mode) in place (owner: "user" or "user:group"), then run `then` as root: two
        round trips in all.

        Files travel through a private temporary directory, so no copy is ever world-readable.
        """
        try:
            tmpdir = self.conn.run("mktemp -d", hide=True, in_stream=False).stdout.strip()
            sftp = self.conn.sftp()
            installs = []
            for number, (data, dest, owner, mode) in enumerate(files):
                payload = data.encode() if isinstance(data, str) else data
                sftp.putfo(io.BytesIO(payload), f"{tmpdir}/{number}")
                user, _, group = owner.partition(":")  # "user" or "user:group"
                installs.append(
                    sh("install", "-D", "-o", user, "-g", group or user, "-m", mode, f"{tmpdir}/{number}", dest)
                )
        except (OSError, paramiko.SSHException, UnexpectedExit) as exc:
            raise DeployError(f"{what} on {self.name}: {exc}") from exc
        script = " && ".join([*installs, f"({then})"])
        self.root(f"{script}; code=$?; rm -rf {sh(tmpdir)}; exit $code", what=what)

    def helper_command(self, release_dir: object, *args: str, build: bool = False) -> str:
        """A root shell command running the app helper (deploy/on_server/app_helper.py) with ARGS and the release's
        Python, as the app user (or, with `build`, as the build user)."""
        return app_helper(self.config, release_dir, *args, app_home=self.app_home, build=build)

    def helper(
        self,
        release_dir: object,
        *args: str,
        what: str,
        timeout: float | None = None,
        on_lines=None,
        wrap=None,
        build: bool = False,
    ) -> list[dict]:
        """Run the app helper with the release's Python as the app user; its JSON lines (ok=False raises).

        `on_lines` sees the lines before a failure is raised (the prepare steps report their timings);
        `wrap` turns the root shell command into another (the deploy lock keeps it alive); `build` runs it as
        the build user.
        """
        command = self.helper_command(release_dir, *args, build=build)
        result = self.root(wrap(command) if wrap else command, what=what, warn=True, timeout=timeout)
        return self.helper_lines(result, what=what, on_lines=on_lines)

    def helper_lines(self, result, *, what: str, on_lines=None) -> list[dict]:
        """The JSON lines of a helper run; a line with ok=False, or a failed run, raises DeployError."""
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        if on_lines:
            on_lines(lines)
        failed = [line for line in lines if not line.get("ok")]
        if failed or result.exited != 0:
            reason = failed[0].get("error") if failed else (result.stderr.strip() or result.stdout.strip())[-1500:]
            step = f" ({failed[0]['step']})" if failed and "step" in failed[0] else ""
            raise DeployError(f"{what}{step} failed on {self.name}: {reason}")
        return lines

    def supervisorctl_command(self, *args: str) -> str:
        return supervisor.supervisorctl(self.config, *args)

    def supervisorctl(self, *args: str, what: str, warn: bool = False, **kwargs):
        return self.root(self.supervisorctl_command(*args), what=what, warn=warn, **kwargs)


def connect(conn: Connection, config: DeployConfig) -> Server:
    """Open `conn` and check the host can be deployed to; every problem is one DeployError line."""
    where = f"{conn.user}@{conn.host}:{conn.port}"
    conn.config.runners.remote = RemoteRunner  # every command of the session (the probe below too)
    hostkeys.pin(conn.client)  # NOTE: Fabric adds any unknown key (AutoAddPolicy): only known_hosts' keys pass
    try:
        conn.open()
    except hostkeys.UnknownHostKey as exc:
        raise hostkeys.unknown_key_error(conn.user, conn.host, conn.port, exc.key) from exc
    except paramiko.BadHostKeyException as exc:
        raise hostkeys.changed_key_error(conn.user, conn.host, conn.port, exc.key, exc.expected_key) from exc
    except paramiko.AuthenticationException as exc:
        raise DeployError(f"{where}: SSH refused the login ({exc}); pass the right key with -i KEY.") from exc
    except socket.gaierror as exc:
        raise DeployError(f"{where}: unknown host name ({exc}).") from exc
    except (OSError, paramiko.SSHException, EOFError) as exc:
        raise DeployError(f"{where}: cannot connect over SSH ({exc or type(exc).__name__}).") from exc
    probe = (
        "id -u; sudo -n true 2>/dev/null && echo sudo-ok; test -d /run/systemd/system && echo systemd; "
        f"getent passwd {sh(config.user)} | sed 's/^/passwd:/'; true"
    )
    try:
        facts = conn.run(probe, hide=True, in_stream=False).stdout.splitlines()
    except (UnexpectedExit, OSError, paramiko.SSHException) as exc:
        raise DeployError(f"{where}: cannot run commands over SSH ({exc}).") from exc
    is_root = bool(facts) and facts[0].strip() == "0"
    sudo_password = False
    if not is_root and "sudo-ok" not in facts:
        if not conn.config.sudo.password:
            raise DeployError(
                f"{where}: {conn.user} cannot sudo without a password; log in as root, give it passwordless "
                "sudo, or add --prompt-for-sudo-password."
            )
        sudo_password = True
    if config.require_systemd and "systemd" not in facts:
        raise DeployError(
            f"{where}: the server does not run systemd, which keeps supervisord (and the site) up across "
            "reboots; use a systemd host (Debian 13 or 12)."
        )
    passwd = [line[len("passwd:") :] for line in facts if line.startswith("passwd:")]
    if not passwd:
        raise DeployError(f"{where}: there is no app user {config.user!r}; run `fab provision` first.")
    return Server(conn, config, is_root, sudo_password, app_home=passwd[0].split(":")[5])
