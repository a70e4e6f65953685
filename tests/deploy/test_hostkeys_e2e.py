"""Pinned SSH host keys: `fab` against real sshd servers, one of them an impostor with its own key.

An attack succeeds when the impostor logs the operator's login ("Accepted publickey"): the commands, the env file and
its secrets would follow. Each refusal has its positive control: the same server, trusted, gets the login.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploy import hostkeys
from deploy.errors import DeployError
from tests.support.ca import wait_port
from tests.support.services import free_port

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).with_name("fab")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
LOGIN = "Accepted publickey for root"


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def sha256(public_key: Path) -> str:
    """The fingerprint OpenSSH prints for a public key (what a provider's console shows)."""
    return subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True).stdout.split()[1]


class Sshd:
    """A real sshd on `address`:port with its own host key, letting in the operator's key as root."""

    def __init__(self, workdir: Path, address: str, client_key: Path):
        self.workdir, self.address, self.port = workdir, address, free_port()
        workdir.mkdir()
        self.host_key = keygen(workdir / "host_key")
        self.log = workdir / "sshd.log"
        config = workdir / "sshd_config"
        config.write_text(
            textwrap.dedent(f"""\
                Port {self.port}
                ListenAddress {address}
                HostKey {self.host_key}
                AuthorizedKeysFile {client_key}.pub
                PidFile {workdir / "sshd.pid"}
                PermitRootLogin prohibit-password
                PasswordAuthentication no
                KbdInteractiveAuthentication no
                StrictModes no
                UsePAM no
            """)
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
        wait_port(address, self.port)

    @property
    def host(self) -> str:
        return f"root@{self.address}:{self.port}"

    @property
    def fingerprint(self) -> str:
        return sha256(self.host_key.with_suffix(".pub"))

    def known_hosts_line(self, public_key: Path | None = None) -> str:
        """A known_hosts line naming this server with `public_key` (its own by default)."""
        kind, key = (public_key or self.host_key.with_suffix(".pub")).read_text().split()[:2]
        return f"[{self.address}]:{self.port} {kind} {key}\n"

    def logins(self) -> int:
        return self.log.read_text().count(LOGIN)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def operator(tmp_path):
    """The operator's HOME (an empty ~/.ssh) and SSH key, and two servers: `real` and an `impostor`."""
    if os.geteuid() != 0 or not Path(SSHD).exists() or not shutil.which("ssh-keygen"):
        pytest.skip("needs root, sshd and ssh-keygen")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    key = keygen(tmp_path / "client_key")
    servers = {"real": Sshd(tmp_path / "real", "127.0.0.1", key), "impostor": Sshd(tmp_path / "imp", "127.0.0.2", key)}
    yield home, key, servers
    for server in servers.values():
        server.stop()


def fab(home: Path, key: Path, *args: str) -> subprocess.CompletedProcess:
    """The real `fab -i KEY ARGS` with HOME as the operator's, no SSH agent."""
    env = {**{k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}, "HOME": str(home)}
    command = [str(FAB), "-r", str(REPO), "-i", str(key), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


def known_hosts(home: Path) -> str:
    path = home / ".ssh/known_hosts"
    return path.read_text() if path.exists() else ""


def test_an_unknown_key_is_refused_with_its_fingerprint_before_any_login(operator):
    home, key, servers = operator
    server = servers["real"]
    result = fab(home, key, "-H", server.host, "status")
    out = result.stdout + result.stderr
    assert result.returncode == 1 and server.fingerprint in out and f"fab -H {server.host} trust" in out, out
    assert server.logins() == 0
    # Positive control: the same server once its key is in known_hosts gets the login.
    (home / ".ssh/known_hosts").write_text(server.known_hosts_line())
    fab(home, key, "-H", server.host, "status")
    assert server.logins() == 1


def test_an_impostor_at_a_trusted_address_is_refused(operator):
    home, key, servers = operator
    impostor, real = servers["impostor"], servers["real"]
    # The operator trusted the real server's key for the address the impostor now answers at.
    (home / ".ssh/known_hosts").write_text(impostor.known_hosts_line(real.host_key.with_suffix(".pub")))
    for task in ("status", "provision", "trust"):
        result = fab(home, key, "-H", impostor.host, task)
        out = result.stdout + result.stderr
        assert result.returncode == 1 and "WARNING" in out and "intercepting" in out, (task, out)
        assert impostor.fingerprint in out and real.fingerprint in out
    assert impostor.logins() == 0
    # Positive control: with the impostor's own key trusted there, it gets the login.
    (home / ".ssh/known_hosts").write_text(impostor.known_hosts_line())
    fab(home, key, "-H", impostor.host, "status")
    assert impostor.logins() == 1


def test_trust_with_a_fingerprint_records_only_a_matching_key(operator):
    home, key, servers = operator
    server, other = servers["real"], servers["impostor"]
    wrong = fab(home, key, "-H", server.host, "trust", "--fingerprint", other.fingerprint)
    assert wrong.returncode == 1 and server.fingerprint in wrong.stderr and "nothing was recorded" in wrong.stderr
    assert known_hosts(home) == "" and server.logins() == 0
    right = fab(home, key, "-H", server.host, "trust", "--fingerprint", server.fingerprint)
    assert right.returncode == 0 and "trusted" in right.stdout, right.stderr
    assert known_hosts(home) == server.known_hosts_line()
    assert oct((home / ".ssh/known_hosts").stat().st_mode & 0o777) == "0o600"
    again = fab(home, key, "-H", server.host, "trust", "--fingerprint", server.fingerprint)
    assert "already trusted" in again.stdout and known_hosts(home) == server.known_hosts_line()
    fab(home, key, "-H", server.host, "status")
    assert server.logins() == 1 and other.logins() == 0


def test_trust_without_a_fingerprint_asks_the_operator(operator, monkeypatch):
    home, key, servers = operator
    server = servers["real"]
    monkeypatch.setenv("HOME", str(home))
    questions = []

    def answer(reply: bool):
        return lambda question: questions.append(question) or reply

    with pytest.raises(DeployError, match="nothing was recorded"):
        hostkeys.trust(server.address, server.port, "root", fingerprints=[], confirm=answer(False))
    assert known_hosts(home) == "" and server.fingerprint in questions[0]
    hostkeys.trust(server.address, server.port, "root", fingerprints=[], confirm=answer(True))
    assert known_hosts(home) == server.known_hosts_line()
    no_terminal = fab(home, key, "-H", servers["impostor"].host, "trust")  # stdin is not a terminal: no prompt
    assert no_terminal.returncode == 1 and "--fingerprint" in no_terminal.stderr


def test_every_host_of_a_site_is_checked_and_trusted(operator, tmp_path):
    home, key, servers = operator
    real, other = servers["real"], servers["impostor"]
    config = tmp_path / "deploy.toml"
    roles = {"web": real, "worker": other, "beat": real, "db": real}
    config.write_text(
        "[environments.two.roles]\n" + "".join(f'{role} = ["{sshd.host}"]\n' for role, sshd in roles.items())
    )
    site = ("--env", "two", "--config", str(config))
    (home / ".ssh/known_hosts").write_text(real.known_hosts_line())
    refused = fab(home, key, "status", *site)
    assert refused.returncode == 1 and other.fingerprint in refused.stderr, refused.stderr
    assert other.logins() == 0
    partial = fab(home, key, "trust", *site, "--fingerprint", real.fingerprint)
    assert partial.returncode == 1 and other.fingerprint in partial.stderr
    both = fab(home, key, "trust", *site, "--fingerprint", f"{real.fingerprint},{other.fingerprint}")
    assert both.returncode == 0, both.stderr
    assert known_hosts(home) == real.known_hosts_line() + other.known_hosts_line()
    fab(home, key, "status", *site)
    assert other.logins() == 1
