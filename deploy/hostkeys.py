"""Pinned SSH host keys: a server is reached only when its key is in the operator's ~/.ssh/known_hosts."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from pathlib import Path

import paramiko

from deploy.errors import DeployError


def known_hosts_path() -> Path:
    """The operator's known_hosts file (OpenSSH's)."""
    return Path(os.path.expanduser("~/.ssh/known_hosts"))


def fingerprint(key: paramiko.PKey) -> str:
    """A key's SHA256 fingerprint as `ssh-keygen -lf` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts names a host: `host`, or `[host]:port` off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_line(host: str, port: int, key: paramiko.PKey) -> str:
    """The known_hosts line that trusts `key` for the host."""
    return f"{known_hosts_name(host, port)} {key.get_name()} {key.get_base64()}\n"


def _target(user: str, host: str, port: int) -> str:
    return f"{user}@{host}" + (f":{port}" if port != 22 else "")


def unknown_key_error(user: str, host: str, port: int, key: paramiko.PKey) -> DeployError:
    """The refusal of a key that known_hosts does not hold, with how to trust it."""
    sha, where, target = fingerprint(key), f"{user}@{host}:{port}", _target(user, host, port)
    return DeployError(
        f"{where}: its SSH host key ({key.get_name()} {sha}) is not in {known_hosts_path()}, so nothing was sent. "
        f"Check it against the server's console (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there), then run "
        f"`fab -H {target} trust` (or `fab -H {target} trust --fingerprint {sha}`)."
    )


def changed_key_error(user: str, host: str, port: int, key: paramiko.PKey, expected: paramiko.PKey) -> DeployError:
    """The refusal of a key other than the one known_hosts holds."""
    where = f"{user}@{host}:{port}"
    return DeployError(
        f"WARNING: {where} presented the SSH host key {fingerprint(key)}, but {known_hosts_path()} holds "
        f"{fingerprint(expected)} for it: someone may be intercepting the connection, so nothing was sent. If the "
        f"server was reinstalled, check its new key on its console, remove the old one (`ssh-keygen -R "
        f"'{known_hosts_name(host, port)}'`), then `fab trust`."
    )


class UnknownHostKey(paramiko.SSHException):
    """The server's host key is not in known_hosts."""

    def __init__(self, key: paramiko.PKey):
        super().__init__(f"unknown host key {fingerprint(key)}")
        self.key = key


class RefuseUnknownKey(paramiko.MissingHostKeyPolicy):
    """Paramiko's policy for a key it does not know: refuse it, before authenticating."""

    def missing_host_key(self, client, hostname, key):
        raise UnknownHostKey(key)


def pin(client: paramiko.SSHClient) -> None:
    """Make `client` accept only the host keys of the operator's known_hosts (it never writes to it)."""
    client.set_missing_host_key_policy(RefuseUnknownKey())
    path = known_hosts_path()
    if path.is_file():
        client.load_system_host_keys(str(path))


def server_key(host: str, port: int, timeout: float | None, *, where: str) -> paramiko.PKey:
    """The host key a server presents, after the key exchange and before any login."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            transport = paramiko.Transport(sock)
            try:
                transport.start_client(timeout=timeout)
                return transport.get_remote_server_key()
            finally:
                transport.close()
    except (OSError, paramiko.SSHException, EOFError) as exc:
        raise DeployError(f"{where}: cannot connect over SSH ({exc or type(exc).__name__}).") from exc


def trust(host: str, port: int, user: str, *, fingerprints: list[str], confirm, timeout: float | None = None) -> str:
    """Record the server's host key in known_hosts when it has one of `fingerprints` or, with none given, when
    `confirm(question)` says yes; a key known_hosts already holds is left as it is, a changed one refused."""
    where, target = f"{user}@{host}:{port}", _target(user, host, port)
    key = server_key(host, port, timeout, where=where)
    sha = fingerprint(key)
    path = known_hosts_path()
    known = paramiko.HostKeys(str(path)) if path.is_file() else paramiko.HostKeys()
    recorded = (known.lookup(known_hosts_name(host, port)) or {}).get(key.get_name())
    if recorded is not None and recorded == key:
        return f"{where}: already trusted ({key.get_name()} {sha})."
    if recorded is not None:
        raise changed_key_error(user, host, port, key, recorded)
    if fingerprints:
        if sha not in fingerprints:
            raise DeployError(
                f"{where}: its SSH host key is {sha}, not {', '.join(fingerprints)}; nothing was recorded. Check the "
                "fingerprint on the server's console."
            )
    elif not confirm(f"{where}: SSH host key {key.get_name()} {sha}. Is this the key the server's console shows?"):
        raise DeployError(
            f"{where}: not trusted; nothing was recorded. Run `fab -H {target} trust` again once checked."
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as file:
        file.write(known_hosts_line(host, port, key))
    return f"{where}: trusted {key.get_name()} {sha} (recorded in {path})."
