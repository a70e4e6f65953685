"""A throwaway certificate authority for the tests' TLS servers (made with openssl, valid two days)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_listener_certificate(
    workdir: Path, addresses: Sequence[str] = (), names: Sequence[str] = (), ca_name: str = "prayer-room test CA"
) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate signed by it for `addresses` and DNS `names`: (ca.pem, cert.pem,
    key.pem)."""
    workdir.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", f"/CN={ca_name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=workdir,
    )  # fmt: skip
    common_name = names[0] if names else "listener"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "req.csr", "-subj",
             f"/CN={common_name}", cwd=workdir)  # fmt: skip
    sans = ",".join([*(f"IP:{address}" for address in addresses), *(f"DNS:{name}" for name in names)])
    (workdir / "ext.cnf").write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "cert.pem",
        "-days", "2", "-extfile", "ext.cnf", cwd=workdir,
    )  # fmt: skip
    return workdir / "ca.pem", workdir / "cert.pem", workdir / "key.pem"


def wait_port(host: str, port: int, timeout: float = 20) -> None:
    """Return once something accepts connections on host:port; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """Stop the test servers started for a fixture, newest first: TERM, then KILL after 10 s."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
