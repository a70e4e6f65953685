"""A throwaway Debian "fresh VPS" for end-to-end tests: a cached debootstrap rootfs booted with systemd-nspawn.

One cached rootfs per release in RELEASES: Debian 13 (trixie, the default) and Debian 12 (bookworm). Each has only
what the deploy contract promises on a fresh server (systemd, sshd, python3, sudo) plus systemd-networkd for a
static address. Each container boots a copy of one in its own network namespace (`--network-veth`); the host routes
and masquerades its traffic, so `apt-get` inside reaches the host's Debian mirror (its apt sources name that mirror
and the release's suites, as a real VPS's do). Traffic between two containers is routed, not masqueraded: each sees
the other's own address (tests/support/cluster.py).

Stdlib only: `.ci/setup.d/25-provision.sh` runs `python3 tests/support/nspawn.py build` before any venv exists.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CACHE_DIR = Path(os.environ.get("PRAYER_ROOM_TEST_CACHE", "/var/cache/prayer-room-tests"))
# The releases the end-to-end layers boot, the default (every container layer) first: suite -> Debian version.
RELEASES = {"trixie": "13", "bookworm": "12"}
DEFAULT_RELEASE = "trixie"
# Bump when the package set or the build steps change: a new name means a fresh build.
ROOTFS_VERSION = "v2"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "sudo", "iproute2")
HOST_TOOLS = ("debootstrap", "systemd-nspawn", "nft", "ip", "ssh", "ssh-keygen")
SUBNET_PREFIX = "10.231"


def missing_tools() -> str | None:
    """Why containers cannot run here (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    missing = [tool for tool in HOST_TOOLS if not shutil.which(tool)]
    if missing:
        return f"missing {', '.join(missing)} (see .ci/setup.d/25-provision.sh)"
    return None


def rootfs_path(suite: str = DEFAULT_RELEASE) -> Path:
    """Where the cached rootfs of `suite` lives."""
    return CACHE_DIR / f"rootfs-{suite}-{ROOTFS_VERSION}"


def host_sources() -> list[Path]:
    """The host's enabled apt source files (where its Debian mirror is named)."""
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    return [f for f in files if f.is_file() and f.suffix in (".list", ".sources") and f.stat().st_size]


def debian_mirror() -> str:
    """The first Debian mirror URI the host's apt sources name (debootstrap fetches the base system from it)."""
    for source in host_sources():
        for line in source.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and len(words) > 2 and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def debian_security_mirror() -> str:
    """The host's Debian security mirror URI, else Debian's own."""
    for source in host_sources():
        for line in source.read_text().splitlines():
            uris = [word for word in line.split() if "://" in word and "security" in word]
            if uris and (line.startswith("URIs:") or line.split()[:1] == ["deb"]):
                return uris[0]
    return "http://deb.debian.org/debian-security"


def render_debian_sources(suite: str) -> str:
    """The rootfs's /etc/apt/sources.list.d/debian.sources, as a fresh VPS of that release has it (deb822): the
    host's mirror, the release with its updates and security suites."""
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    return "\n".join(
        f"Types: deb\nURIs: {uri}\nSuites: {suites}\nComponents: main\nSigned-By: {keyring}\n"
        for uri, suites in (
            (debian_mirror(), f"{suite} {suite}-updates"),
            (debian_security_mirror(), f"{suite}-security"),
        )
    )


def build_rootfs(suite: str = DEFAULT_RELEASE) -> Path:
    """Build the cached rootfs of `suite` once (one to three minutes); later calls return it at once.

    A lock file keeps two test sessions from building the same one at once (the second waits, then uses it).
    """
    target = rootfs_path(suite)
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            _build(suite, target)
    return target


def _build(suite: str, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", suite, str(partial), debian_mirror()],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (partial / "etc/apt/sources.list").unlink(missing_ok=True)
    (partial / "etc/apt/sources.list.d/debian.sources").write_text(render_debian_sources(suite))
    subprocess.run(["chroot", str(partial), "systemctl", "enable", "systemd-networkd", "ssh"], check=True)
    subprocess.run(["chroot", str(partial), "apt-get", "clean"], check=True)
    (partial / "etc/hostname").write_text("vps\n")
    (partial / ".complete").write_text(time.strftime("%F %T\n"))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


# A subnet in use is claimed with a lock on a file here, held until the container is destroyed or its test session
# ends: the deploy layer runs as more than one pytest session, and a container between two boots has no route.
SUBNET_CLAIMS = Path("/run/prayer-room-tests/subnets")
_claimed_subnets: dict[int, int] = {}  # subnet -> the claim's file descriptor


def _free_subnet() -> int:
    """A subnet no container of this session or another one uses: not routed, and claimed (see SUBNET_CLAIMS)."""
    SUBNET_CLAIMS.mkdir(parents=True, exist_ok=True)
    routes = _run("ip", "-4", "route").stdout
    free = [n for n in range(1, 255) if f"{SUBNET_PREFIX}.{n}." not in routes and n not in _claimed_subnets]
    random.shuffle(free)
    for subnet in free:
        fd = os.open(SUBNET_CLAIMS / str(subnet), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another session's container, between two boots
            os.close(fd)
            continue
        _claimed_subnets[subnet] = fd
        return subnet
    raise RuntimeError(f"no free {SUBNET_PREFIX}.N.0/24 for a test container: every one is routed or claimed")


def _release_subnet(subnet: int) -> None:
    fd = _claimed_subnets.pop(subnet, None)
    if fd is not None:
        os.close(fd)


@dataclass
class Container:
    """One booted copy of the rootfs, reachable over SSH as root with `key` at `address`."""

    workdir: Path
    name: str = field(default_factory=lambda: f"prt-{random.randrange(16**4):04x}")
    subnet: int = field(default_factory=_free_subnet)
    process: subprocess.Popen | None = None
    boots: int = 0

    @property
    def address(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.2"

    @property
    def gateway(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    @property
    def rootfs(self) -> Path:
        return self.workdir / "rootfs"

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    @property
    def host_link(self) -> str:
        return f"ve-{self.name}"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def create(self, base: Path | None = None) -> Container:
        """Copy the rootfs (`base`: the default release's), give it a static address on host0 and authorize a fresh
        root key."""
        base = base or build_rootfs()
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(self.rootfs)], check=True)
        network = self.rootfs / "etc/systemd/network/10-host0.network"
        network.write_text(
            f"[Match]\nName=host0\n\n[Network]\nAddress={self.address}/24\nGateway={self.gateway}\nLinkLocalAddressing=no\n"
        )
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "prayer-room-tests", "-f", str(self.key))
        host_key = self.rootfs / "etc/ssh/ssh_host_ed25519_key"  # its own SSH host key, as each VPS has
        host_key.unlink(missing_ok=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        self._trust_what_the_host_trusts()
        ssh_dir = self.rootfs / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(self.key.with_suffix(".pub"), ssh_dir / "authorized_keys")
        return self

    def _trust_what_the_host_trusts(self) -> None:
        """Give the container the host's CA certificates and pip's pointer to them, as it gets its resolver.

        NOTE: where the host reaches PyPI through a TLS-inspecting proxy, pip inside (a vendored certifi)
        fails with CERTIFICATE_VERIFY_FAILED without this. A real VPS needs neither.
        """
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        if not bundle.is_file():
            return
        (self.rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle, self.rootfs / bundle.relative_to("/"))
        local = self.rootfs / "usr/local/share/ca-certificates"  # kept if apt runs update-ca-certificates
        local.mkdir(parents=True, exist_ok=True)
        for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(cert, local / cert.name)
        (self.rootfs / "etc/pip.conf").write_text(f"[global]\ncert = {bundle}\n")

    def known_hosts_line(self) -> str:
        """The operator's known_hosts line trusting this container's SSH host key (what `fab trust` records)."""
        kind, key = (self.rootfs / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2]
        return f"{self.address} {kind} {key}\n"

    def add_user(self, name: str, *, sudo: bool) -> None:
        """A login user with the same key, with passwordless sudo or none (before boot or while running)."""
        chroot = ["chroot", str(self.rootfs)]
        subprocess.run([*chroot, "useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        home = self.rootfs / "home" / name
        (home / ".ssh").mkdir(mode=0o700)
        shutil.copy(self.key.with_suffix(".pub"), home / ".ssh/authorized_keys")
        subprocess.run([*chroot, "chown", "-R", f"{name}:{name}", f"/home/{name}/.ssh"], check=True)
        if sudo:
            rule = self.rootfs / "etc/sudoers.d" / name
            rule.write_text(f"{name} ALL=(ALL) NOPASSWD:ALL\n")
            rule.chmod(0o440)

    def boot(self, *, init: bool = True, timeout: float = 60) -> None:
        """Start the container (systemd as PID 1, or sshd alone with init=False) and wait for sshd."""
        command = [
            "systemd-nspawn",
            f"--directory={self.rootfs}",
            f"--machine={self.name}",
            "--network-veth",
            "--resolv-conf=replace-host",
            # NOTE: no systemd (and so no D-Bus) on the test host: skip machined and the scope unit.
            "--register=no",
            "--keep-unit",
            "--console=passive" if init else "--console=pipe",
        ]
        if init:
            command.append("--boot")
        else:
            # A server without systemd: sshd in the foreground as PID 1, and the address set up by us.
            command += ["--", "/bin/sh", "-c", self._no_init_script()]
        log = self.console_log.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.boots += 1
        self._connect_host_side(timeout)
        self.wait_for_ssh(timeout)

    def _no_init_script(self) -> str:
        return (
            "while ! ip link show host0 | grep -q UP; do ip link set host0 up; sleep 0.2; done; "
            f"ip addr add {self.address}/24 dev host0; ip route add default via {self.gateway}; "
            "mkdir -p /run/sshd; exec /usr/sbin/sshd -D -e"
        )

    def _connect_host_side(self, timeout: float) -> None:
        """Address and NAT for the host end of the veth (recreated at every boot)."""
        deadline = time.monotonic() + timeout
        while _run("ip", "link", "show", self.host_link, check=False).returncode:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.host_link} did not appear; see {self.console_log}")
            time.sleep(0.1)
        _run("ip", "addr", "replace", f"{self.gateway}/24", "dev", self.host_link)
        _run("ip", "link", "set", self.host_link, "up")
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        table = self.name.replace("-", "_")
        _run("nft", "delete", "table", "ip", table, check=False)
        # Out to the world (the Debian mirror) masqueraded; to another test container not: a cluster's hosts see
        # each other's own addresses, as on a private network. Forwarding to and from the link is accepted.
        rules = (
            f"table ip {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat;\n"
            f"    ip saddr {self.address} ip daddr != {SUBNET_PREFIX}.0.0/16"
            f' oifname != "{self.host_link}" masquerade\n  }}\n'
            "  chain forward {\n    type filter hook forward priority filter; policy accept;\n"
            f'    iifname "{self.host_link}" accept\n    oifname "{self.host_link}" accept\n  }}\n}}\n'
        )
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)

    def _check_alive(self) -> None:
        if self.process and self.process.poll() is not None:
            raise RuntimeError(f"container exited with {self.process.returncode}; see {self.console_log}")

    def wait_for_ssh(self, timeout: float = 60) -> float:
        """Seconds until sshd answers with its banner."""
        start = time.monotonic()
        while True:
            self._check_alive()
            try:
                with socket.create_connection((self.address, 22), timeout=1) as sock:
                    sock.settimeout(2)
                    if sock.recv(4).startswith(b"SSH"):
                        return time.monotonic() - start
            except OSError:
                pass
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"sshd on {self.address} did not answer in {timeout}s; see {self.console_log}")
            time.sleep(0.3)

    def ssh(self, command: str, *, user: str = "root", check: bool = True) -> subprocess.CompletedProcess:
        """Run a command in the container over the real SSH client."""
        return subprocess.run(
            ["ssh", *self.ssh_options(), f"{user}@{self.address}", command],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def ssh_options(self) -> list[str]:
        return [
            "-i",
            str(self.key),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=5",
        ]

    def reboot(self, timeout: float = 120) -> None:
        """Reboot from inside (`systemctl reboot`) and boot again: nspawn exits with 133 on a container reboot."""
        self.ssh("systemctl reboot", check=False)
        assert self.process is not None
        self.process.wait(timeout=timeout)
        self.process = None
        self.boot(timeout=timeout)

    @contextmanager
    def rebooting_on_request(self, *, come_back: bool = True) -> Iterator[list[int]]:
        """While the block runs, a reboot asked from inside (`systemctl reboot`, `reboot`: systemd-nspawn exits with
        133) boots the container again, as a VPS's hypervisor does; with `come_back=False` it stays off (a server
        that never comes back). Yields the exit codes seen."""
        seen: list[int] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                process = self.process
                if process is None or process.poll() is None:
                    done.wait(0.2)
                    continue
                seen.append(process.returncode)
                self.process = None
                if process.returncode != 133 or not come_back:
                    return
                self.boot()

        thread = threading.Thread(target=watch, name=f"{self.name}-reboots", daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            done.set()
            thread.join(120)

    def stop(self, timeout: float = 60) -> None:
        """Power off (SIGTERM makes nspawn halt the container cleanly), then kill if it hangs."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pull_the_plug(self) -> None:
        """A power cut: every packet to or from it dropped at once (its peers get silence, not a reset, and the host
        forwards nothing of it anywhere else once its link is gone), then its init killed with SIGKILL, which ends
        every process inside (killing systemd-nspawn alone would leave them running)."""
        table = self.name.replace("-", "_") + "_cut"
        rules = (
            f"table inet {table} {{\n"
            f"  chain forward {{ type filter hook forward priority -10; ip saddr {self.address} drop; "
            f"ip daddr {self.address} drop; }}\n"
            f"  chain output {{ type filter hook output priority -10; ip daddr {self.address} drop; }}\n}}\n"
        )
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
        assert self.process is not None
        inits = _run("ps", "-o", "pid=", "--ppid", str(self.process.pid)).stdout.split()
        for pid in inits:
            os.kill(int(pid), 9)
        self.process.wait(timeout=30)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        _run("nft", "delete", "table", "ip", self.name.replace("-", "_"), check=False)
        _run("nft", "delete", "table", "inet", self.name.replace("-", "_") + "_cut", check=False)
        shutil.rmtree(self.rootfs, ignore_errors=True)
        _release_subnet(self.subnet)


def operator_env(home: Path, *containers: Container) -> dict[str, str]:
    """The environment `fab` runs in against the containers: HOME's known_hosts trusts their host keys, and no SSH
    agent (only the key given with -i)."""
    (home / ".ssh").mkdir(mode=0o700, parents=True, exist_ok=True)
    (home / ".ssh/known_hosts").write_text("".join(container.known_hosts_line() for container in containers))
    return {**{key: value for key, value in os.environ.items() if key != "SSH_AUTH_SOCK"}, "HOME": str(home)}


if __name__ == "__main__":
    suites = sys.argv[2:] or list(RELEASES)
    if sys.argv[1:2] != ["build"] or not set(suites) <= set(RELEASES):
        sys.exit(f"usage: python3 tests/support/nspawn.py build [{' '.join(RELEASES)}]")
    for suite in suites:  # one after the other: debootstrap is mostly the mirror's bandwidth
        started = time.monotonic()
        print(f"rootfs: {build_rootfs(suite)} ({time.monotonic() - started:.0f}s)", flush=True)
