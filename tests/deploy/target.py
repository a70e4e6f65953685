"""A throwaway deploy target on this machine: sshd on loopback, a server layout in a temp dir, a real
supervisord, nginx in front, PostgreSQL and Redis. Used by the end-to-end tests and bench/deploy.py."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from deploy.config import load_config
from deploy.render.nginx import render_nginx_site
from deploy.render.supervisord import local_context, render_supervisord_conf
from tests.support.stack import Database, claim_redis_db, free_port, redis_url, release_redis_db, services_unavailable

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
APP_USER = "prayer-room-e2e"
BUILD_USER = f"{APP_USER}-build"  # DeployConfig.build_user: collectstatic's
NO_SUDO_USER = "prayer-room-nosudo"  # logs in over SSH, cannot sudo
SUDO_USER = "prayer-room-sudoer"  # logs in over SSH, passwordless sudo
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def postgres_client_bin() -> str:
    """Where the target's pg_dump/pg_restore/psql are: the PATH's when at least as new as the session's server,
    else the pgserver wheel's (the throwaway server's own); "" means the PATH's."""
    import importlib.util

    import psycopg

    from tests.support.stack import postgres_url

    with psycopg.connect(postgres_url()) as conn:
        server_major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000
    on_path = shutil.which("pg_dump")
    if on_path:
        version = subprocess.run([on_path, "--version"], capture_output=True, text=True).stdout.split()[-1]
        if int(version.split(".")[0]) >= server_major:
            return ""
    spec = importlib.util.find_spec("pgserver")  # not imported: its import sets up lock files
    if spec is None or not spec.submodule_search_locations:
        return ""
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin")


def unavailable() -> str | None:
    """Why this machine cannot host the deploy target, or None."""
    if os.geteuid() != 0:
        return "the deploy target needs root (sshd, runuser, a system user)"
    for tool in (SSHD, "ssh-keygen", "nginx", "git", "sudo", "/usr/bin/python3"):
        if not (shutil.which(tool) or Path(tool).exists()):
            return f"{tool} is not installed (.ci/setup.d/20-deploy.sh installs it)"
    if subprocess.run(["/usr/bin/python3", "-c", "import venv, ensurepip"], capture_output=True).returncode:
        return "/usr/bin/python3 cannot make virtualenvs (apt-get install python3-venv)"
    return services_unavailable()


def ensure_user(name: str, shell: str = "/usr/sbin/nologin") -> None:
    """A system user; a login shell and an unlocked account (password "*") when it must log in over SSH."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        home = f"/var/lib/{name}"
        subprocess.run(["useradd", "--system", "--create-home", "--home-dir", home, "--shell", shell, name], check=True)
    if shell != "/usr/sbin/nologin":
        subprocess.run(["usermod", "--shell", shell, "-p", "*", name], check=True)


def ensure_sudoer(name: str) -> None:
    """A login user with passwordless sudo (what many VPS images give instead of root)."""
    ensure_user(name, shell="/bin/sh")
    rule = Path(f"/etc/sudoers.d/{name}")
    if not rule.exists():
        rule.write_text(f"{name} ALL=(ALL) NOPASSWD: ALL\n")
        rule.chmod(0o440)


def ensure_app_user() -> None:
    """The app user and the build user, as `fab provision` creates them."""
    ensure_user(APP_USER)
    ensure_user(BUILD_USER)


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def http_get(url: str, timeout: float = 5, **kwargs) -> tuple[int | None, str]:
    return http_request(url, timeout=timeout, **kwargs)


def http_request(
    url: str, data: dict | None = None, *, timeout: float = 5, headers: dict | None = None, context=None
) -> tuple[int | None, str]:
    """GET `url`, or POST `data` as JSON: (status, body), status None when there was no answer."""
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return None, str(exc)


@dataclass
class RequestLoop:
    """GETs `url` back to back in a thread, each followed by the `posts` (url, JSON body); any answer other
    than 200/201 is a failure. `request(url, data)` sends one: http_request, or the caller's (e.g. HTTPS)."""

    url: str
    posts: tuple[tuple[str, dict], ...] = ()
    request: Callable[..., tuple[int | None, str]] = http_request
    ok: int = 0
    posted: int = 0
    rounds: int = 0
    slowest: float = 0.0  # seconds: the longest any request took to be answered (or to fail)
    failures: list[str] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)  # time.monotonic() of each failure, in the same order
    releases: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RequestLoop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _timed(self, *args) -> tuple[int | None, str]:
        started = time.monotonic()
        try:
            return self.request(*args)
        finally:
            self.slowest = max(self.slowest, time.monotonic() - started)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = self._timed(self.url)
            if status == 200:
                self.ok += 1
                if '"release"' in body:
                    self.releases.add(body.split('"release":')[1].split('"')[1])
            else:
                self.failures.append(f"GET {status}: {body[:200]}")
                self.failed_at.append(time.monotonic())
            for url, data in self.posts:
                status, body = self._timed(url, data)
                if status in (200, 201):
                    self.posted += 1
                else:
                    self.failures.append(f"POST {url.split('/', 3)[-1]} {status}: {body[:200]}")
                    self.failed_at.append(time.monotonic())
            self.rounds += 1
            time.sleep(0.01)

    def wait_for_more(self, rounds: int, timeout: float = 60) -> None:
        """Until the loop has made `rounds` more rounds (a GET and its POSTs) than when called."""
        until, deadline = self.rounds + rounds, time.monotonic() + timeout
        while self.rounds < until:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the request loop made {self.rounds} rounds, not {until}, in {timeout} s")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def history_rows(out: str) -> list[list[str]]:
    """`fab history`'s rows as cells (WHEN, EVENT, RESULT, TIME, WHO, WHAT): columns are 2+ spaces apart."""
    return [re.split(r" {2,}", line) for line in out.splitlines()[1:] if re.match(r"\d{4}-\d\d-\d\d ", line)]


# The operator's git identity (their ~/.gitconfig); a Clone commits as CLONE_AUTHOR (its own config).
OPERATOR = ("e2e operator", "operator@example.invalid")
CLONE_AUTHOR = ("deploy e2e", "e2e@example.invalid")


class Clone:
    """A temporary git clone of the repository: what `fab deploy --repo` ships."""

    def __init__(self, path: Path, source: Path = REPO):
        self.path = path
        subprocess.run(["git", "clone", "--quiet", str(source), str(path)], check=True)
        self.git("config", "user.name", CLONE_AUTHOR[0])
        self.git("config", "user.email", CLONE_AUTHOR[1])

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.path), *args], check=True, capture_output=True, text=True).stdout

    def commit_file(self, relative: str, text: str, message: str) -> str:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        self.git("add", relative)
        self.git("commit", "--quiet", "-m", message)
        return self.git("rev-parse", "HEAD").strip()

    def revert_head(self) -> None:
        self.git("revert", "--no-edit", "HEAD")


class DeployTarget:
    """Start with `start()`, stop with `stop()`; `fab(...)` runs this repo's fabfile against it."""

    def __init__(self, workdir: Path, redis_db: int | None = None, **config_overrides):
        self.workdir = workdir
        self.redis_db = redis_db  # None: one claimed for this target at start()
        self._claimed_redis_db = redis_db is None
        self.srv = workdir / "srv"
        self.etc = workdir / "etc"
        self.home = workdir / "home"  # the operator's HOME: a known_hosts trusting this target, no ssh config
        self.ssh_port = free_port()
        self.nginx_port = free_port()
        self.web_ports = (free_port(), free_port())
        self.key = workdir / "client_key"
        self.config_file = workdir / "deploy.toml"
        self.database = Database()
        self.config_overrides = config_overrides
        self._procs: list[subprocess.Popen] = []

    # --- set-up -------------------------------------------------------------------------
    def start(self) -> DeployTarget:
        ensure_app_user()
        for d in (self.srv, self.etc, self.home / ".ssh"):
            d.mkdir(parents=True, exist_ok=True)
        (self.home / ".gitconfig").write_text(f"[user]\n\tname = {OPERATOR[0]}\n\temail = {OPERATOR[1]}\n")
        os.chmod(self.workdir, 0o755)  # the app user walks through it to reach srv/
        self._start_sshd()
        self.database.create()
        if self._claimed_redis_db:
            self.redis_db = claim_redis_db("deploy")
        redis.Redis.from_url(f"{redis_url()}/{self.redis_db}").flushdb()
        self._provision_layout()
        self._start_supervisord()
        self._write_config()
        self._start_nginx()
        return self

    def _start_sshd(self) -> None:
        ssh = self.workdir / "ssh"
        ssh.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "host_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        shutil.copy(f"{self.key}.pub", ssh / "authorized_keys")
        kind, key = (ssh / "host_key.pub").read_text().split()[:2]  # the operator trusts it, as `fab trust` records
        (self.home / ".ssh/known_hosts").write_text(f"[127.0.0.1]:{self.ssh_port} {kind} {key}\n")
        config = ssh / "sshd_config"
        config.write_text(
            textwrap.dedent(f"""\
                Port {self.ssh_port}
                ListenAddress 127.0.0.1
                HostKey {ssh / "host_key"}
                AuthorizedKeysFile {ssh / "authorized_keys"}
                PidFile {ssh / "sshd.pid"}
                PermitRootLogin prohibit-password
                PasswordAuthentication no
                KbdInteractiveAuthentication no
                StrictModes no
                UsePAM no
                MaxStartups 50
                MaxSessions 50
                Subsystem sftp internal-sftp
            """)
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self._spawn([SSHD, "-D", "-e", "-f", str(config)], "sshd.log")
        wait_port(self.ssh_port)

    def _provision_layout(self) -> None:
        """What `fab provision` leaves behind, minus the system services: root's (the env file's group: the app's)."""
        user = pwd.getpwnam(APP_USER)
        for d in (self.srv, self.srv / "shared"):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        for d, mode in ((self.srv / "log", 0o750), (self.run, 0o700)):
            d.mkdir(exist_ok=True)
            d.chmod(mode)
        env_file = self.srv / "shared" / "env"
        env_file.write_text(
            textwrap.dedent(f"""\
                # written by the deploy e2e harness
                SECRET_KEY={secrets.token_urlsafe(50)}%x
                ALLOWED_HOSTS=127.0.0.1,localhost
                DATABASE_URL={self.database.url}
                CELERY_BROKER_URL={redis_url()}/{self.redis_db}
                CACHE_URL={redis_url()}/{self.redis_db}
                EMAIL_URL=consolemail://
                THROTTLE_SUBMIT=1000000/hour
                THROTTLE_PRAYED=1000000/hour
                SECURE_SSL_REDIRECT=false
                SECURE_COOKIES=false
                SECURE_HSTS_SECONDS=0
            """)
        )
        os.chown(env_file, 0, user.pw_gid)
        env_file.chmod(0o640)

    @property
    def run(self) -> Path:
        return self.workdir / "run"

    @property
    def supervisord_conf(self) -> Path:
        return self.etc / "supervisord.conf"

    def _start_supervisord(self) -> None:
        context = local_context(REPO, self.srv, sys.executable)
        context.update(
            processes={},
            supervisord={
                "socket": str(self.run / "supervisor.sock"),
                "pidfile": str(self.run / "supervisord.pid"),
                "logfile": str(self.srv / "log" / "supervisord.log"),
                "socket_owner": None,
                "include": [str(self.etc / "programs.conf")],
            },
        )
        self.supervisord_conf.write_text(render_supervisord_conf(context))
        self._spawn([str(VENV_BIN / "supervisord"), "-n", "-c", str(self.supervisord_conf)], "supervisord.out")
        deadline = time.monotonic() + 15
        while self.supervisorctl("pid").returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("supervisord did not answer on its socket")
            time.sleep(0.2)

    def _start_nginx(self) -> None:
        """nginx with the site `fab provision` renders (only the listen address and port are the test's),
        inside the http block of a stand-in for Debian's nginx.conf."""
        nginx = self.workdir / "nginx"
        nginx.mkdir()
        config = load_config(self.config_file, "e2e")
        site = render_nginx_site(config, "127.0.0.1", ipv6=False, address="127.0.0.1", http_port=self.nginx_port)
        (nginx / "site.conf").write_text(site)
        (nginx / "nginx.conf").write_text(
            textwrap.dedent("""\
                worker_processes 1;
                pid {d}/nginx.pid;
                error_log {d}/error.log;
                events {{ worker_connections 256; }}
                http {{
                    include /etc/nginx/mime.types;
                    default_type application/octet-stream;
                    access_log {d}/access.log;
                    client_body_temp_path {d}/body;
                    proxy_temp_path {d}/proxy;
                    fastcgi_temp_path {d}/fastcgi;
                    uwsgi_temp_path {d}/uwsgi;
                    scgi_temp_path {d}/scgi;
                    include {d}/site.conf;
                }}
            """).format(d=nginx)
        )
        self._spawn(["nginx", "-p", str(nginx), "-c", str(nginx / "nginx.conf"), "-g", "daemon off;"], "nginx.out")
        wait_port(self.nginx_port)

    def _write_config(self) -> None:
        self.config_file_with()

    def config_file_with(self, **overrides) -> Path:
        """Write the e2e environment (plus `overrides`) to a deploy config; the first one is self.config_file."""
        settings = {
            "hosts": [f"root@127.0.0.1:{self.ssh_port}"],
            "user": APP_USER,
            "root": str(self.srv),
            "etc": str(self.etc),
            "run": str(self.run),
            "sbin": str(self.workdir / "sbin"),
            "python": "/usr/bin/python3",
            "supervisorctl": str(VENV_BIN / "supervisorctl"),
            "require_systemd": False,
            "web_ports": list(self.web_ports),
            "web_workers": 2,
            "worker_concurrency": 1,
            "task_time_limit": 30,
            "web_graceful_timeout": 10,
            "health_timeout": 40,
            "backup_dir": str(self.workdir / "backups"),
            "postgres_bin": postgres_client_bin(),
            "write_rate_per_minute": 0,  # the request loops POST far more than a visitor may
            **self.config_overrides,
            **overrides,
        }

        def toml(value) -> str:
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, list):
                return "[" + ", ".join(toml(v) for v in value) + "]"
            return str(value) if isinstance(value, int) else f'"{value}"'

        lines = ["[environments.e2e]", *(f"{key} = {toml(value)}" for key, value in settings.items())]
        path = (
            self.config_file
            if not overrides
            else self.workdir / f"deploy-{len(list(self.workdir.glob('deploy*.toml')))}.toml"
        )
        path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn(self, argv: list[str], log: str) -> None:
        out = (self.workdir / log).open("wb")
        self._procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    # --- use ----------------------------------------------------------------------------
    def fab_argv(
        self, task: str, *args: str, repo=None, key=None, hosts=None, env="e2e", config=None, kit=None
    ) -> list[str]:
        """`fab -i KEY [-H HOSTS] TASK --env e2e --config ... ARGS [--repo REPO]` with this repository's fabfile (or
        the one in `kit`, a directory holding another commit's fabfile.py and deploy/)."""
        argv = [str(VENV_BIN / "fab"), "-r", str(kit or REPO), "-i", str(key or self.key)]
        argv += ["-H", hosts] if hosts else []
        argv += [task, "--env", env, "--config", str(config or self.config_file), *args]
        return argv + (["--repo", str(repo)] if repo is not None else [])

    def fab(self, task: str, *args: str, timeout: float = 900, **options) -> subprocess.CompletedProcess:
        """Run a fab task against this target; output captured. HOME is the operator's (its known_hosts trusts it)."""
        env = {**os.environ, "HOME": str(self.home)}
        argv = self.fab_argv(task, *args, **options)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)

    def fab_background(self, task: str, *args: str, **options) -> subprocess.Popen:
        env = {**os.environ, "HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        argv = self.fab_argv(task, *args, **options)
        # NOTE: a shell without job control starts background jobs with SIGINT ignored, and Python keeps an ignored
        # SIGINT ignored: the default action back, so that a test's Ctrl-C reaches fab however the run was started.
        return subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "supervisorctl"), "-c", str(self.supervisord_conf), *args], capture_output=True, text=True
        )

    def states(self) -> dict[str, str]:
        out = self.supervisorctl("status").stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if len(line.split()) > 1}

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}/health/"

    def api_posts(self) -> tuple[tuple[str, dict], ...]:
        """What the request loop POSTs through nginx beside its GETs: a new request, and "I prayed" for an
        approved one (made here, in the deployed database)."""
        self.database.query(
            "INSERT INTO prayer_room_api_location (name, slug, is_active, created_at)"
            " VALUES ('Deploy e2e', 'deploy-e2e', true, now()) ON CONFLICT DO NOTHING"
        )
        (location_id,) = self.database.query("SELECT id FROM prayer_room_api_location WHERE slug = 'deploy-e2e'")[0]
        (request_id,) = self.database.query(
            "INSERT INTO prayer_room_api_prayerrequest (content, name, type, location_id, created_at, updated_at,"
            " prayer_count, approved_at, response) VALUES ('pray for the deploy', 'e2e', 'prayer', %s, now(), now(),"
            " 0, now(), '') RETURNING id",
            (location_id,),
        )[0]
        base = f"http://127.0.0.1:{self.nginx_port}/api/requests/"
        submit = {"type": "prayer", "content": "a request sent during a deploy", "location": "deploy-e2e"}
        return ((base, submit), (f"{base}{request_id}/prayed/", {}))

    def request_loop(self) -> RequestLoop:
        """GET /health/, POST a request and POST "prayed", back to back through nginx."""
        return RequestLoop(self.front_url, posts=self.api_posts())

    def live_release(self) -> str | None:
        link = self.srv / "current"
        return os.readlink(link).rstrip("/").rsplit("/", 1)[-1] if link.is_symlink() else None

    def releases(self) -> list[str]:
        return sorted(p.name for p in (self.srv / "releases").iterdir() if p.is_dir())

    # --- tear-down ------------------------------------------------------------------------
    def stop(self) -> None:
        self.supervisorctl("stop", "all")
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        try:
            self.database.drop()
        except Exception:  # noqa: BLE001 - tear-down goes on
            pass
        if self.redis_db is not None:
            redis.Redis.from_url(f"{redis_url()}/{self.redis_db}").flushdb()
            if self._claimed_redis_db:
                release_redis_db(self.redis_db)
