"""The server's security boundary, end to end: on a fresh Debian 13 and a fresh Debian 12 that `fab provision` and
`fab deploy` built (one nspawn container per release, over real SSH), an attacker with code execution as the app
user tries each step of issue 9's list, after a deploy and again after a rollback; every one must fail for its
reason (EACCES, EPERM, the service's refusal) and change nothing, and the same step done as root in a throwaway copy
of the server's directories (its positive control) must work.

The attacker here is a shell as the app user outside the unit's sandbox: stronger than code running inside
web, worker or beat, which also meet the read-only file system and an empty capability set.
PRAYER_ROOM_LYNIS=1 also measures lynis' hardening index before provision and after the deploy (not in CI).
"""

from __future__ import annotations

import base64
import hashlib
import http.cookiejar
import io
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from fabric import Config, Connection

from deploy import release
from deploy.commands import users
from deploy.config import load_config
from deploy.errors import DeployError
from deploy.ssh import Server
from tests.support.nspawn import RELEASES, Container, build_rootfs, missing_tools, operator_env
from tests.support.units import exposure, measured_in, release_of

REPO = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).with_name("fab")
ARTIFACTS = REPO / "test-artifacts"
APP = "prayer-room"
SRV = "/srv/prayer-room"
ENV = f"{SRV}/shared/env"
SOCKET = "/run/prayer-room/supervisor.sock"
ADMIN_PASSWORD = secrets.token_urlsafe(16)
STATIC_ATTACKER = Path(__file__).with_name("static_attacker.py")

pytestmark = [pytest.mark.deploy, pytest.mark.skipif(bool(missing_tools()), reason=str(missing_tools()))]
report: dict[str, object] = {}

EACCES = "Permission denied"
EPERM = "Operation not permitted"


@dataclass(frozen=True)
class Attack:
    """A shell command that exits 0 only if the step worked, what its refusal must say (the errno's message, or
    the service's), and who runs it. Its positive control runs the same command as root, after `control_setup`
    (e.g. giving it the password the attacker lacks), with `control_overlays` replaced by throwaway copies: it must
    succeed, so a wrong path, glob or command cannot pass for a refusal."""

    command: str
    refusal: str = EACCES
    user: str = APP
    control_setup: str = ""
    control_overlays: tuple[str, ...] = (SRV, "/etc/prayer-room", "/run/prayer-room")


REDIS_PASSWORD = f"\"$(sed -n 's/^CELERY_BROKER_URL=redis:..[^:]*:\\([^@]*\\)@.*/\\1/p' {ENV})\""
ATTACKS = {
    "append a line to the live release's urls.py": Attack(
        f"echo 'import os' >> {SRV}/current/project/prayer_room_api/urls.py"
    ),
    "plant a .pth file in the live virtualenv": Attack(
        f"echo 'import os' > \"$(echo {SRV}/current/.venv/lib/python3*/site-packages)/zz-attacker.pth\""
    ),
    "replace a static file the live release serves": Attack(
        f"f=$(find {SRV}/current/static -name '*.css' | head -n 1) && echo 'body{{}}' > \"$f\""
    ),
    "add a static file to the live release": Attack(f"echo 'alert(1)' > {SRV}/current/static/attacker.js"),
    "add a virtualenv a later deploy would reuse": Attack(f"mkdir {SRV}/venvs/0000000000000000"),
    "add a release": Attack(f"mkdir {SRV}/releases/29990101000000-000000000000"),
    "point current at a copy of its own": Attack(
        f'rm -rf /tmp/own-copy && cp -r "$(readlink -f {SRV}/current)" /tmp/own-copy'
        f" && ln -sfn /tmp/own-copy {SRV}/.current-x && mv -T {SRV}/.current-x {SRV}/current"
    ),
    "swap venvs/ for a symlink to a root-only directory": Attack(
        f"mv {SRV}/venvs {SRV}/venvs.old && ln -s /root/.ssh {SRV}/venvs"
    ),
    "append a line to the env file": Attack(f"echo DEBUG=true >> {ENV}"),
    "replace the env file": Attack(f"cp {ENV} /tmp/env && echo DEBUG=true >> /tmp/env && mv -f /tmp/env {ENV}"),
    "make the env file readable by every account": Attack(f"chmod 0644 {ENV}", refusal=EPERM),
    "replace beat.log with a symlink into /root/.ssh": Attack(f"ln -sfn /root/.ssh/authorized_keys {SRV}/log/beat.log"),
    "replace the log directory": Attack(f"mv {SRV}/log {SRV}/log.old"),
    "connect to supervisord's socket (restart beat)": Attack(
        f"python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect(\"{SOCKET}\")'",
        control_overlays=(SRV, "/etc/prayer-room"),  # the live socket: a copy's accepts no connection
    ),
    "replace supervisord's socket": Attack(f"rm -f {SOCKET} && ln -s /tmp/fake.sock {SOCKET}"),
    "signal root's supervisord": Attack(
        'pid=$(systemctl show -p MainPID --value prayer-room) && [ "$pid" -gt 1 ] && kill -0 "$pid"', refusal=EPERM
    ),
    "write the programs config": Attack("echo '[program:x]' >> /etc/prayer-room/programs.conf"),
    "read the programs config (the env values)": Attack("cat /etc/prayer-room/programs.conf"),
    "use Redis without the password (broker, cache)": Attack(
        f'out=$(redis-cli -h 127.0.0.1 --user {APP} -n 0 dbsize 2>&1); echo "$out";'
        ' case "$out" in *NOAUTH*) exit 1;; esac',
        refusal="NOAUTH Authentication required",
        control_setup=f"export REDISCLI_AUTH={REDIS_PASSWORD};",
    ),
    "sudo": Attack("sudo -n true", refusal="a password is required"),
    "make a home of its own for user site-packages": Attack(f"mkdir -p {SRV}/.local"),
    "another local account reads the env file": Attack(f"cat {ENV}", user="nobody"),
}
# The attacks, in one SSH session: each runs as its user in a shell of its own from /tmp, as as_app runs one.
ATTACKER = """
import json, subprocess, sys
results = {}
for name, (user, command) in json.load(sys.stdin).items():
    run = subprocess.run(["runuser", "-u", user, "--", "sh", "-c", command], cwd="/tmp",
                         capture_output=True, text=True, timeout=120)
    results[name] = [run.returncode, run.stdout + run.stderr]
print(json.dumps(results))
"""
# The controls' throwaway copies: each control runs in a mount namespace of its own in which its overlays are
# overlay mounts (writes land in a tmpfs) and /tmp is an empty tmpfs; the server itself is left as it was.
CONTROLS = """
import json, subprocess, sys
results = {}
for name, (command, overlays) in json.load(sys.stdin).items():
    setup = " && ".join(["mount -t tmpfs control /mnt"] + [
        f"mkdir /mnt/u{n} /mnt/w{n} && mount -t overlay overlay"
        f" -o lowerdir={d},upperdir=/mnt/u{n},workdir=/mnt/w{n},redirect_dir=on {d}"
        for n, d in enumerate(overlays)
    ] + ["mount -t tmpfs tmp /tmp", "cd /tmp"])
    run = subprocess.run(["unshare", "--mount", "sh", "-c", f"{setup} || exit 99; {command}"],
                         capture_output=True, text=True, timeout=120)
    results[name] = [run.returncode, (run.stdout + run.stderr)[-300:]]
print(json.dumps(results))
"""


@pytest.fixture(scope="module", params=list(RELEASES))
def server(request, tmp_path_factory):
    vps = Container(tmp_path_factory.mktemp(f"vps-{request.param}")).create(build_rootfs(request.param))
    vps.boot()
    try:
        if os.environ.get("PRAYER_ROOM_LYNIS"):
            report["lynis before provision"] = lynis_index(vps)
        report["outputs"] = outputs = {}
        for name, args in (("provision", ["provision"]), ("deploy", ["deploy", "--allow-dirty"])):
            outputs[name] = expect_ok(fab(vps, *args))
        wait_for_the_next_second(vps)  # a release id names its second: the next deploy's must be another
        outputs["deploy again"] = expect_ok(fab(vps, "deploy", "--allow-dirty"))
        in_app(
            vps,
            "manage.py createsuperuser --noinput --username admin --email admin@example.org",
            env=f"DJANGO_SUPERUSER_PASSWORD={shlex.quote(ADMIN_PASSWORD)}",
        )
        if os.environ.get("PRAYER_ROOM_LYNIS"):
            report["lynis after provision and deploy"] = lynis_index(vps)
        yield vps
    finally:
        vps.destroy()
        ARTIFACTS.mkdir(exist_ok=True)
        public = {key: value for key, value in report.items() if key != "outputs"}
        (ARTIFACTS / f"security-e2e-{request.param}.json").write_text(json.dumps(public, indent=1) + "\n")
        report.clear()


def fab(vps: Container, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    command = [str(FAB), "-H", f"root@{vps.address}", "-i", str(vps.key), *args]
    env = operator_env(vps.workdir / "operator", vps)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def wait_for_the_next_second(vps: Container) -> None:
    """Until this machine's clock (fab names a release after it, in UTC) is past the live release id's second."""
    live = vps.ssh(f"basename $(readlink {SRV}/current)").stdout.split("-")[0]
    deadline = time.monotonic() + 10
    while time.strftime("%Y%m%d%H%M%S", time.gmtime()) <= live:
        assert time.monotonic() < deadline, f"the clock does not pass {live}"
        time.sleep(0.05)


def expect_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def as_app(vps: Container, command: str, user: str = APP) -> subprocess.CompletedProcess:
    """`command` in a shell as `user` (cwd /tmp), as code execution in the app would run it."""
    return vps.ssh(f"cd /tmp && runuser -u {user} -- sh -c {shlex.quote(command)}", check=False)


def in_app(vps: Container, command: str, env: str = "") -> str:
    """A manage.py command line of the live release, as the app user with the env file's values (and `env`)."""
    script = f"set -a; . {ENV}; set +a; cd {SRV}/current/project && env {env} ../.venv/bin/python {command}"
    result = as_app(vps, script)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def lynis_index(vps: Container) -> int:
    vps.ssh("DEBIAN_FRONTEND=noninteractive apt-get -qq install -y lynis >/dev/null 2>&1 || apt-get -qq update")
    vps.ssh("command -v lynis || DEBIAN_FRONTEND=noninteractive apt-get -qq install -y lynis >/dev/null")
    out = vps.ssh("lynis audit system --quick --no-colors 2>/dev/null | grep -i 'hardening index'", check=False)
    return int(re.search(r"index : (\d+)", out.stdout).group(1))


def fingerprint(vps: Container) -> str:
    """What the attacks must leave as it was: the code, the env file, the configs, the layout and /root/.ssh."""
    listed = f"{SRV} {SRV}/releases {SRV}/venvs {SRV}/shared {SRV}/log /root/.ssh /run/prayer-room"
    return vps.ssh(
        f"cd / && find {listed} -maxdepth 1 -printf '%p %u %g %m %y %l\\n' | sort;"
        f" md5sum {ENV} /etc/prayer-room/*.conf $(readlink -f {SRV}/current)/project/prayer_room_api/urls.py;"
        f" find {SRV}/venvs -name '*.pth' | sort | md5sum; systemctl show -p MainPID --value prayer-room"
    ).stdout


def run_attacks(vps: Container) -> dict[str, tuple[int, str]]:
    """Each attack's command as its user (exit code, output), all in one SSH session (ATTACKER)."""
    commands = {name: [attack.user, attack.command] for name, attack in ATTACKS.items()}
    result = subprocess.run(
        ["ssh", *vps.ssh_options(), f"root@{vps.address}", f"python3 -c {shlex.quote(ATTACKER)}"],
        input=json.dumps(commands), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return {name: (code, said) for name, (code, said) in json.loads(result.stdout).items()}


def run_controls(vps: Container) -> dict[str, tuple[int, str]]:
    """Each attack's command as root (after its control_setup) in throwaway copies of the server's directories."""
    commands = {
        name: [f"{attack.control_setup} {attack.command}".strip(), attack.control_overlays]
        for name, attack in ATTACKS.items()
    }
    result = subprocess.run(
        ["ssh", *vps.ssh_options(), f"root@{vps.address}",
         f"python3 -c {shlex.quote(CONTROLS)}"],
        input=json.dumps(commands), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return {name: (code, said) for name, (code, said) in json.loads(result.stdout).items()}


def attack_all(vps: Container, phase: str) -> None:
    """Every attack refused for its reason, and the same step as root in a throwaway copy worked (its control)."""
    before = fingerprint(vps)
    outcomes, wrong = {}, []
    started = time.monotonic()
    attacks = run_attacks(vps)
    report[f"attacks {phase}, seconds"] = round(time.monotonic() - started, 1)
    for name, (code, said) in attacks.items():
        attack, said = ATTACKS[name], said.strip()
        last = said.splitlines()[-1][-160:] if said else ""
        refused = code != 0 and attack.refusal in said
        outcomes[name] = ("refused" if refused else "WORKED" if code == 0 else "FAILED") + f": {last}"
        if not refused:
            wrong.append(f"{name}: exit {code}, expected {attack.refusal!r}: {said[-300:]}")
    assert fingerprint(vps) == before  # checked before the controls, which must not change it either
    started = time.monotonic()
    controls = run_controls(vps)
    report[f"controls {phase}, seconds"] = round(time.monotonic() - started, 1)
    for name, (code, said) in controls.items():
        outcomes[name] += f" / as root: {'worked' if code == 0 else f'FAILED ({code})'}"
        if code != 0:
            wrong.append(f"{name}: the control as root failed with exit {code}: {said}")
    report[f"attacks {phase}"] = outcomes
    assert wrong == [], "\n".join(wrong)
    assert fingerprint(vps) == before


def running_pids(vps: Container) -> dict[str, str]:
    out = vps.ssh("supervisorctl status").stdout  # plain, as an operator types it: no -c
    return {words[0]: words[3].rstrip(",") for words in map(str.split, out.splitlines()) if words[1:2] == ["RUNNING"]}


def test_the_deploy_prints_check_deploy_warnings(server):
    out = report["outputs"]["deploy"]
    # SECURE_SSL_REDIRECT=false without TLS: Django's security.W008, shown rather than hidden behind "ok".
    assert "security.W008" in out, out


def test_the_units_are_sandboxed(server):
    """Every service the kit installs on a single server (tests/support/units.py) rated by `systemd-analyze security`
    at most its bound for this release; the figures go to the report (test-artifacts)."""
    release, exposures, over = release_of(server), {}, []
    for service in measured_in(__name__):
        exposures[service.unit], out = exposure(server, service.unit)
        if exposures[service.unit] > service.bound[release]:
            over.append(f"{service.unit}: {exposures[service.unit]} > {service.bound[release]} on {release}\n{out}")
    report["systemd-analyze security exposure"] = exposures
    assert over == [], "\n".join(over)
    # The watchdog works inside its sandbox: a run (a oneshot, done when it returns) reads everything it checks.
    started = time.monotonic()
    server.ssh("systemctl start prayer-room-watchdog.service")
    report["watchdog run in its sandbox, seconds"] = round(time.monotonic() - started, 1)
    journal = (
        "journalctl -o cat --no-pager _SYSTEMD_INVOCATION_ID="
        "$(systemctl show -p InvocationID --value prayer-room-watchdog.service)"
    )
    deadline = time.monotonic() + 15
    while not re.search(r"^watchdog: \d+ checks in ", run := server.ssh(journal).stdout, re.M):
        assert time.monotonic() < deadline, f"no summary line from the watchdog's run in its journal: {run}"
        time.sleep(0.5)  # journald may store the run's last lines a moment after the unit ended
    assert not re.search("cannot tell|check failed", run), run
    # The backup service works inside its sandbox (it writes its directory only): a oneshot, done when it returns.
    before = server.ssh("ls /var/backups/prayer-room | grep -c daily; true").stdout.strip()
    server.ssh("systemctl start prayer-room-backup.service")
    assert int(server.ssh("ls /var/backups/prayer-room | grep -c daily").stdout) > int(before or 0)
    pids = running_pids(server)
    assert {"prayer-room:web-1", "prayer-room:worker", "prayer-room:beat"} <= set(pids)
    status = server.ssh(f"cat /proc/{pids['prayer-room:web-1']}/status").stdout
    assert re.search(r"^Uid:\s+(\d+)", status, re.M).group(1) != "0"
    assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^NoNewPrivs:\s+1$", status, re.M)


def test_the_attacks_fail_after_a_deploy(server):
    attack_all(server, "after deploy")


def test_no_static_file_can_be_planted_while_a_deploy_collects_them(server):
    """The attacker races collectstatic: from the moment the new release's static/ exists until it is root's."""
    stop = "/tmp/stop-static-attacker"
    attack = (
        f"cd /tmp && runuser -u {APP} -- python3 -c {shlex.quote(STATIC_ATTACKER.read_text())} {SRV}/releases {stop}"
    )
    attacker = subprocess.Popen(
        ["ssh", *server.ssh_options(), f"root@{server.address}", f"rm -f {stop}; {attack}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert attacker.stdout.readline() == "watching\n"  # it listed the releases there before the deploy
        out = expect_ok(fab(server, "deploy", "--allow-dirty"))
    finally:
        server.ssh(f"touch {stop}", check=False)
        found = json.loads(attacker.communicate(timeout=60)[0].splitlines()[-1])
    report["static attacker during a deploy"] = {**found, "planted": found["planted"][:10]}
    assert "ok  collectstatic" in out
    assert found["rounds_before_root_took_it"] > 0, found  # it raced collectstatic, not only the sealed result
    assert found["planted"] == [], found["planted"][:10]
    assert server.ssh(f"find {SRV}/current/static/ -name planted.js -o ! -user root").stdout == ""
    try:
        status = urllib.request.urlopen(f"http://{server.address}/static/planted.js", timeout=10).status
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status == 404


def test_nothing_survives_into_the_rollback(server):
    out = expect_ok(fab(server, "rollback"))
    assert " is live" in out
    attack_all(server, "after rollback")


def test_admin_logins_lock_out_and_staff_clear_them(server):
    def login(password: str) -> int:
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)
        url = f"http://{server.address}/admin/login/"
        form = opener.open(url, timeout=10).read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
        data = urllib.parse.urlencode(
            {"csrfmiddlewaretoken": token, "username": "admin", "password": password, "next": "/admin/"}
        ).encode()
        headers = {"Referer": url, "X-Forwarded-For": "203.0.113.66"}  # a claimed address, not believed
        try:
            return opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=10).status
        except urllib.error.HTTPError as exc:
            return exc.code

    answers = [login(f"wrong-{n}") for n in range(30)]
    report["30 wrong admin logins (HTTP status of each)"] = answers
    assert answers[:4] == [200] * 4 and set(answers[5:]) == {429}, answers
    assert login(ADMIN_PASSWORD) == 429  # locked out, the right password too
    # NUM_PROXIES=1: the address axes recorded is the one nginx saw (this machine), not the one the client claimed.
    recorded = in_app(
        server, "manage.py shell -c 'from axes.models import AccessAttempt as A; print(A.objects.get().ip_address)'"
    )
    assert recorded.split()[-1:] == [server.gateway], recorded  # after the shell's "N objects imported" line
    in_app(server, "manage.py axes_reset_username admin")  # what staff do (or delete the attempt in the admin)
    deadline = time.monotonic() + 30
    while (status := login(ADMIN_PASSWORD)) == 429 and time.monotonic() < deadline:
        time.sleep(0.5)  # nginx's login limit (10 a minute per address) lets the next one through within 6 s
    assert status == 302


def test_api_basic_auth_is_off(server):
    token = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        f"http://{server.address}/api/moderation/requests/", headers={"Authorization": f"Basic {token}"}
    )
    try:
        status = urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as exc:
        status = exc.code
    report["API with the admin's password over Basic auth"] = status
    assert status in (401, 403)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


# --- a hostile dependency: a wheel whose .pth runs at every start of the venv's Python, and a package without a
# wheel whose build backend runs at install; each writes /tmp/<what>-ran-<uid>, served from a local index.
INDEX = "/srv/hostile-index"
PTH = 'import os; open("/tmp/pth-ran-%d" % os.getuid(), "a").close()\n'
BACKEND = (
    'import os\nopen("/tmp/build-ran-%d" % os.getuid(), "a").close()\n'
    "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
)
# What the kit ran before (deploy/commands/release.py, as root): the positive control.
OLD_BUILD = (
    "cd / && umask 022 && rm -rf {venv} && python3 -m venv {venv} && {venv}/bin/pip install --quiet "
    "--disable-pip-version-check --root-user-action=ignore --require-hashes --no-deps -r {lock}; {venv}/bin/pip check"
)


def hostile_index() -> tuple[bytes, dict[str, str]]:
    """A PEP 503 index (as a tar to unpack at INDEX) with pthproof 1.0 (a wheel) and nowheel 1.0 (an sdist only),
    and a hash-pinned lock for each."""

    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    wheel = io.BytesIO()
    files = {
        "pthproof.pth": PTH,
        "pthproof-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: pthproof\nVersion: 1.0\n",
        "pthproof-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(text.encode())}\n"
        for name, text in files.items()
    )
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in {
            **files,
            "pthproof-1.0.dist-info/RECORD": record + "pthproof-1.0.dist-info/RECORD,,\n",
        }.items():
            archive.writestr(name, text)
    sdist = io.BytesIO()
    with tarfile.open(fileobj=sdist, mode="w:gz") as archive:
        for name, text in {
            "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
            "backend.py": BACKEND,
            "PKG-INFO": "Metadata-Version: 2.1\nName: nowheel\nVersion: 1.0\n",
        }.items():
            add(archive, f"nowheel-1.0/{name}", text.encode())
    packages = {
        "pthproof": ("pthproof-1.0-py3-none-any.whl", wheel.getvalue()),
        "nowheel": ("nowheel-1.0.tar.gz", sdist.getvalue()),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for project, (filename, data) in packages.items():
            add(archive, f"simple/{project}/{filename}", data)
            link = f'<a href="{filename}#sha256={sha256(data)}">{filename}</a>\n'
            add(archive, f"simple/{project}/index.html", f"<!DOCTYPE html><html><body>{link}</body></html>".encode())
    locks = {project: f"{project}==1.0 --hash=sha256:{sha256(data)}\n" for project, (_, data) in packages.items()}
    return out.getvalue(), locks


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


def test_root_never_runs_package_code(server):
    """The kit builds a venv from a hostile index: the .pth runs only as the build user (never root), the package
    without a wheel is refused by name and its build never runs; the old build, as root, ran both as root."""
    tar, locks = hostile_index()
    ran = "ls -ln /tmp | awk '/ (pth|build)-ran-/ {print $NF, $3}' | sort"
    cleanup = f"rm -rf {INDEX} {SRV}/venvs/zz-* /tmp/pth-ran-* /tmp/build-ran-*"
    put = " && ".join(
        [f"mkdir -p {INDEX}/simple", f"tar -x -C {INDEX} --no-same-owner"]
        + [f"printf %s {shlex.quote(text)} > {INDEX}/{project}.lock" for project, text in locks.items()]
        + [f"chmod -R a+rX {INDEX}"]
    )
    subprocess.run(["ssh", *server.ssh_options(), f"root@{server.address}", f"{cleanup}; {put}"],
                   input=tar, check=True, capture_output=True, timeout=60)  # fmt: skip
    config = load_config(REPO / "deploy.toml")
    conn = Connection(
        server.address, user="root", config=Config(overrides={"run": {"env": {"PIP_INDEX_URL": f"file://{INDEX}/simple"}}}),
        connect_kwargs={"key_filename": str(server.key), "allow_agent": False},
    )  # fmt: skip
    kit = Server(conn, config, is_root=True, sudo_password=False, app_home="/root")
    build_uid = server.ssh(f"id -u {config.build_user}").stdout.strip()
    started = time.monotonic()
    try:
        release.build_venv(kit, PurePosixPath(f"{INDEX}/pthproof.lock"), "zz-pthproof")
        assert release.venv_runs(kit, "zz-pthproof")
        with pytest.raises(DeployError, match=r"requirements.lock's nowheel==1.0 has no binary wheel for python3"):
            release.build_venv(kit, PurePosixPath(f"{INDEX}/nowheel.lock"), "zz-nowheel")
        now = server.ssh(ran).stdout.split("\n")
        venv = f"{SRV}/venvs/zz-pthproof"
        assert server.ssh(f"find {venv} ! -user root -o -perm /022 ! -type l; ls {venv}/.complete").stdout == (
            f"{venv}/.complete\n"
        )
        # An OS upgrade removes the Python a venv was made with: the deploy sees it and builds the venv again.
        server.ssh(f"ln -sfn /usr/bin/python3.0 {venv}/bin/python")
        assert not release.venv_runs(kit, "zz-pthproof")
        report["hostile dependency: the kit's build, seconds"] = round(time.monotonic() - started, 1)
        server.ssh("rm -f /tmp/pth-ran-* /tmp/build-ran-*")
        for project in locks:  # the positive control: the build as it was, as root
            old = OLD_BUILD.format(venv=f"{SRV}/venvs/zz-old-{project}", lock=f"{INDEX}/{project}.lock")
            server.ssh(f"export PIP_INDEX_URL=file://{INDEX}/simple; {old}", check=False)
        before = server.ssh(ran).stdout.split("\n")
    finally:
        conn.close()
        server.ssh(cleanup, check=False)
    report["hostile dependency: files written (name, uid)"] = {"kit": now, "old build as root": before}
    assert now == [f"pth-ran-{build_uid} {build_uid}", ""], now  # the .pth ran, as the build user only
    assert before == ["build-ran-0 0", "pth-ran-0 0", ""], before


SDIST_ONLY = "prayer-room-sdist-only"  # no such project on PyPI: only the local index has it, as an sdist


def sdist_only_index() -> tuple[bytes, str]:
    """A PEP 503 index (a tar to unpack at INDEX) with SDIST_ONLY 1.0 as an sdist only (its build backend would write
    /tmp/build-ran-<uid>), and its hash-pinned lock line."""
    sdist = io.BytesIO()
    with tarfile.open(fileobj=sdist, mode="w:gz") as archive:
        for name, text in {
            "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
            "backend.py": BACKEND,
            "PKG-INFO": f"Metadata-Version: 2.1\nName: {SDIST_ONLY}\nVersion: 1.0\n",
        }.items():
            add(archive, f"{SDIST_ONLY.replace('-', '_')}-1.0/{name}", text.encode())
    filename, data = f"{SDIST_ONLY.replace('-', '_')}-1.0.tar.gz", sdist.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        add(archive, f"simple/{SDIST_ONLY}/{filename}", data)
        link = f'<a href="{filename}#sha256={digest}">{filename}</a>\n'
        add(archive, f"simple/{SDIST_ONLY}/index.html", f"<!DOCTYPE html><html><body>{link}</body></html>".encode())
    return out.getvalue(), f"{SDIST_ONLY}==1.0 \\\n    --hash=sha256:{digest}\n"


def test_fab_deploy_refuses_a_dependency_without_a_wheel_by_name(server, tmp_path):
    """The operator commits a lock that adds a package the server's Python has no wheel for (served, as an sdist
    only, from a local index the server's pip also reads): `fab deploy` of that commit exits non-zero with one line
    naming it, its build never runs, and the live release is untouched and still serving."""
    tar, line = sdist_only_index()
    # The server's pip (/etc/pip.conf, which the build user's pip reads too) also looks in the local index.
    pip_conf = f"extra-index-url = file://{INDEX}/simple"
    cleanup = (
        f"rm -rf {INDEX} /tmp/build-ran-*; [ ! -f /etc/pip.conf ] || sed -i '/^extra-index-url = file:/d' /etc/pip.conf"
    )
    setup = (
        f"mkdir -p {INDEX} && tar -x -C {INDEX} --no-same-owner && chmod -R a+rX {INDEX}"
        f" && {{ [ -f /etc/pip.conf ] || echo '[global]' > /etc/pip.conf; }} && echo '{pip_conf}' >> /etc/pip.conf"
    )
    subprocess.run(["ssh", *server.ssh_options(), f"root@{server.address}", f"{cleanup}; {setup}"],
                   input=tar, check=True, capture_output=True, timeout=60)  # fmt: skip
    checkout = tmp_path / "checkout"
    git = ["git", "-C", str(checkout), "-c", "user.name=operator", "-c", "user.email=operator@example.org"]
    subprocess.run(["git", "clone", "--quiet", "--shared", str(REPO), str(checkout)], check=True, timeout=60)
    lock = checkout / "requirements.lock"
    blocks = lock.read_text().split("\n")
    at = next(n for n, text in enumerate(blocks) if text[:1].isalpha() and text.split("==")[0] > SDIST_ONLY)
    lock.write_text("\n".join([*blocks[:at], *line.rstrip("\n").split("\n"), *blocks[at:]]))  # in the lock's order
    subprocess.run([*git, "commit", "--quiet", "-am", f"Add {SDIST_ONLY}"], check=True, timeout=60)
    live = server.ssh(f"readlink {SRV}/current").stdout
    wait_for_the_next_second(server)
    started = time.monotonic()
    try:
        result = fab(server, "deploy", "--repo", str(checkout))
        seconds = round(time.monotonic() - started, 1)
        built = server.ssh("ls /tmp | grep build-ran- || true").stdout
        # Positive control: the build user's pip (the live venv's, the same /etc/pip.conf) does see the sdist in
        # the local index, so the refusal is for want of a wheel, not an index pip never read.
        pip = f"{SRV}/current/.venv/bin/pip"
        seen = server.ssh(users.as_build(f"cd / && {pip} index versions --disable-pip-version-check {SDIST_ONLY}",
                                         f"{APP}-build", APP), check=False)  # fmt: skip
    finally:
        server.ssh(cleanup, check=False)
    said = [text for text in (result.stdout + result.stderr).splitlines() if text.startswith("error: ")]
    report["fab deploy of a lock with an sdist-only package"] = {"exit": result.returncode, "said": said,
                                                                 "seconds": seconds}  # fmt: skip
    assert seen.returncode == 0 and f"{SDIST_ONLY} (1.0)" in seen.stdout, seen.stdout + seen.stderr
    assert result.returncode != 0 and len(said) == 1, result.stdout + result.stderr
    assert "No matching distribution" not in said[0], said
    assert f"requirements.lock's {SDIST_ONLY}==1.0 has no binary wheel for python3" in said[0], said
    assert "stopped before the switch" in said[0], said
    assert built == ""  # its build backend never ran
    assert server.ssh(f"readlink {SRV}/current").stdout == live
    assert urllib.request.urlopen(f"http://{server.address}/health/", timeout=10).status == 200


BURST = """
import json, sys, urllib.error, urllib.request
host, count = sys.argv[1], int(sys.argv[2])
seen = {}
for path in ("/admin/login/", "/api/requests/999999/prayed/"):
    seen[path] = []
    for _ in range(count):
        request = urllib.request.Request("http://127.0.0.1" + path, data=b"{}", method="POST",
                                         headers={"Host": host, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        seen[path].append("nginx" if status == 429 and b"<center>nginx</center>" in body else status)
print(json.dumps(seen))
"""


def test_nginx_rate_limits_login_posts_and_public_writes(server):
    """A burst of 40 POSTs to /admin/login/ and to "prayed" from one address (the server's own loopback: its own
    bucket): past deploy.toml's bursts (10 and 20) nginx answers 429 itself. The positive control: the same burst
    with the site's limit_req lines taken out reaches Django every time."""

    def burst() -> dict[str, list]:
        out = server.ssh(f"python3 -c {shlex.quote(BURST)} {server.address} 40").stdout
        return json.loads(out)

    site = "$(grep -l prayer_room_login /etc/nginx/sites-enabled/*)"
    limited = burst()
    try:
        server.ssh(f"cp {site} /root/site.saved && sed -i '/limit_req/d' {site} && systemctl restart nginx")
        unlimited = burst()
    finally:
        server.ssh(f"cp /root/site.saved {site} && rm /root/site.saved && systemctl restart nginx")
    report["nginx limits: a burst of 40 POSTs (nginx: its own 429)"] = {"now": limited, "without limit_req": unlimited}
    login, write = limited["/admin/login/"], limited["/api/requests/999999/prayed/"]
    assert "nginx" not in login[:10] and login.count("nginx") >= 25, login  # Django's 403 (no CSRF token) first
    assert "nginx" not in write[:20] and write.count("nginx") >= 15, write  # Django's 404 (no such request) first
    assert all("nginx" not in answers for answers in unlimited.values()), unlimited


# Cloud metadata addresses: the link-local ones (IPv4 and IPv6), AWS's IPv6 one and Alibaba Cloud's.
METADATA = ("169.254.169.254", "fe80::a9fe:a9fe", "fd00:ec2::254", "100.100.100.200")
METADATA_PORT = 8181  # a stand-in service on every address of the server (`::`, both families)


def test_the_app_users_cannot_reach_link_local_addresses(server):
    """As the app user (the programs) and the build user (a package's code while the venv is built), a connection to
    each cloud metadata address (here on the server's loopback, a stand-in listening) is refused at once: IPv4 with
    EHOSTUNREACH, IPv6 with EACCES (nftables' admin-prohibited). The positive control: root connects to each.
    (The unit's IPAddressDeny= is not enforced in a container: no cgroup BPF.)"""
    connect = (
        "import socket, sys\n"
        "for address in sys.argv[1:]:\n"
        "    target = address + '%lo' if address.startswith('fe80:') else address\n"
        "    try:\n"
        f"        socket.create_connection((target, {METADATA_PORT}), timeout=5).close(); print(address, 'connected')\n"
        "    except OSError as exc:\n"
        "        print(address, exc.strerror or type(exc).__name__)\n"
    )
    probe = f"python3 -c {shlex.quote(connect)} {' '.join(METADATA)}"
    users = (APP, f"{APP}-build")
    add = " && ".join(f"ip addr add {a}/{'128 dev lo nodad' if ':' in a else '32 dev lo'}" for a in METADATA)
    delete = "; ".join(f"ip addr del {a}/{128 if ':' in a else 32} dev lo" for a in METADATA)
    connected = "\n".join(f"{address} connected" for address in METADATA)
    try:
        server.ssh(
            f"{add} && systemd-run --unit=metadata-stand-in --property=Type=exec"
            f" python3 -m http.server --bind :: {METADATA_PORT}"
        )
        control = server.ssh(
            f'for i in $(seq 50); do out=$({probe}); [ "$out" = {shlex.quote(connected)} ] && break; sleep 0.1; done;'
            ' echo "$out"',
            check=False,
        )
        refused = {user: server.ssh(f"cd / && runuser -u {user} -- {probe}", check=False) for user in users}
    finally:
        server.ssh(f"systemctl stop metadata-stand-in; {delete}", check=False)
    outcome = {user: dict(line.split(" ", 1) for line in run.stdout.splitlines()) for user, run in refused.items()}
    report["connect to the cloud metadata addresses"] = outcome | {"root (the control)": control.stdout.strip()}
    assert control.stdout.strip() == connected, control.stdout + control.stderr  # the stand-in answers root
    for user, said in outcome.items():
        assert said == {
            address: "Permission denied" if ":" in address else "No route to host" for address in METADATA
        }, (user, said, refused[user].stderr)


# RESP commands to the Redis on 127.0.0.1:PORT, each on a connection of its own logged in with the env file's broker
# URL (its user and password; `default`: the password alone), as code running as the app user could: each reply's
# first line, in JSON.
REDIS_PROBE = """
import json, socket, sys
from urllib.parse import unquote, urlsplit
lines = open(sys.argv[1]).read().splitlines()
url = urlsplit(next(line.split("=", 1)[1] for line in lines if line.startswith("CELERY_BROKER_URL=")))
port, login, commands = int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
auth = [unquote(url.password)] if login == "default" else [unquote(url.username), unquote(url.password)]
def send(f, words):
    data = [w.encode() for w in words]
    f.write(b"*%d\\r\\n" % len(data) + b"".join(b"$%d\\r\\n%s\\r\\n" % (len(w), w) for w in data))
    f.flush()
    return f.readline().decode(errors="replace").strip() or "(closed)"
replies = []
for words in commands:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            f = s.makefile("rwb")
            said = send(f, ["AUTH", *auth])
            replies.append(send(f, words) if said == "+OK" else f"AUTH {said}")
    except OSError as exc:
        replies.append(f"(closed: {exc})")
print(json.dumps(replies))
"""
OUTSIDE = "other-site:key"  # a key, and a channel, outside the app's prefix
# What an attacker holding the app's Redis login tries, in an order the positive control survives (REPLICAOF undone
# at once, SHUTDOWN last), with what the refusal must say: NOPERM from the ACL, but CONFIG is renamed away (unknown
# command) and Redis 7 refuses DEBUG before the ACL is asked (enable-debug-command no). CONFIG SET sets Redis's
# default: the control's must succeed, and Redis 7 refuses `dir` (a protected config) to every user anyway.
REDIS_ATTACKS = {
    "FLUSHALL": (["FLUSHALL"], "NOPERM"),
    "FLUSHDB": (["FLUSHDB"], "NOPERM"),
    "CONFIG SET": (["CONFIG", "SET", "maxmemory-policy", "noeviction"], "unknown command"),
    "REPLICAOF another server": (["REPLICAOF", "127.0.0.1", "1"], "NOPERM"),
    "SLAVEOF NO ONE": (["SLAVEOF", "NO", "ONE"], "NOPERM"),
    "MODULE LIST": (["MODULE", "LIST"], "NOPERM"),
    "DEBUG SLEEP 0": (["DEBUG", "SLEEP", "0"], "DEBUG command not allowed|NOPERM"),
    "KEYS *": (["KEYS", "*"], "NOPERM"),
    "MONITOR": (["MONITOR"], "NOPERM"),
    "ACL SETUSER (widen its own keys)": (["ACL", "SETUSER", APP, "~*"], "NOPERM"),
    "SCRIPT FLUSH": (["SCRIPT", "FLUSH"], "NOPERM"),
    "FUNCTION FLUSH": (["FUNCTION", "FLUSH"], "NOPERM"),
    "SET a key outside the prefix": (["SET", OUTSIDE, "x"], "NOPERM"),
    "GET a key outside the prefix": (["GET", OUTSIDE], "NOPERM"),
    "EVAL declaring a key outside the prefix": (["EVAL", "return redis.call('GET', KEYS[1])", "1", OUTSIDE], "NOPERM"),
    "EVAL touching an undeclared key outside": (["EVAL", f"return redis.call('SET', '{OUTSIDE}', 'x')", "0"],
                                                "NOPERM|can't access|[Nn]o permissions"),
    "PUBLISH outside the prefix": (["PUBLISH", OUTSIDE, "x"], "NOPERM"),
    "SUBSCRIBE outside the prefix": (["SUBSCRIBE", OUTSIDE], "NOPERM"),
    "PSUBSCRIBE to every channel": (["PSUBSCRIBE", "*"], "NOPERM"),
    "SHUTDOWN": (["SHUTDOWN", "NOSAVE"], "NOPERM"),
}  # fmt: skip
# What the app does, which the ACL must let through: a key under the prefix, and a script declaring it.
REDIS_ALLOWED = [["SET", "prayer-room:e2e", "1"], ["EVAL", "return redis.call('GET', KEYS[1])", "1", "prayer-room:e2e"]]
CONTROL_PORT = 6390


def redis_probe(vps: Container, commands: list[list[str]], port: int = 6379, login: str = "app") -> list[str]:
    """REDIS_PROBE as the app user: each command's first reply line."""
    args = shlex.join(["python3", "-c", REDIS_PROBE, ENV, str(port), login, json.dumps(commands)])
    result = as_app(vps, args)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_the_apps_redis_login_cannot_flush_reconfigure_replicate_or_leave_its_prefix(server):
    """Code running as the app user reads the env file's Redis login: every admin or dangerous command, and every key
    or channel outside the app's prefix, is refused, while what the app does works. The positive control: the same
    commands with the same login succeed against a scratch Redis whose user has every permission (what a single
    server's requirepass gave the default user before; plus DEBUG, which Redis 7 keeps off by default)."""
    allowed = redis_probe(server, REDIS_ALLOWED)
    commands = [words for words, _ in REDIS_ATTACKS.values()]
    replies = dict(zip(REDIS_ATTACKS, redis_probe(server, commands), strict=True))
    started = server.ssh(
        f"pw={REDIS_PASSWORD}; runuser -u redis -- redis-server --port {CONTROL_PORT} --bind 127.0.0.1 --save ''"
        " --appendonly no --dir /tmp --daemonize yes --pidfile /tmp/redis-control.pid --enable-debug-command yes"
        f' --enable-module-command yes --user {APP} on ">$pw" "~*" "&*" "+@all"'
        f" && for i in $(seq 50); do redis-cli -p {CONTROL_PORT} ping 2>/dev/null | grep -q PONG && exit 0;"
        " sleep 0.1; done; exit 1",
        check=False,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        control = dict(zip(REDIS_ATTACKS, redis_probe(server, commands, port=CONTROL_PORT), strict=True))
    finally:
        server.ssh("kill $(cat /tmp/redis-control.pid) 2>/dev/null; rm -f /tmp/redis-control.pid", check=False)
    report["redis: the app's login on the server / with every permission"] = {
        name: f"{replies[name][:70]} / {control[name][:40]}" for name in REDIS_ATTACKS
    }
    wrong = [
        f"{name}: {replies[name]!r}"
        for name, (_, refusal) in REDIS_ATTACKS.items()
        if not (replies[name].startswith("-") and re.search(refusal, replies[name]))
    ]
    assert wrong == [], "\n".join(wrong)
    assert allowed == ["+OK", "$1"], allowed
    assert all(not reply.startswith(("-", "AUTH")) for reply in control.values()), control


# What provision wrote at the end of redis.conf before the ACL user: the password for the default user.
OLD_REDIS_BLOCK = ["# --- fab provision (prayer-room): begin", "requirepass $pw", 'rename-command CONFIG ""',
                   "# --- fab provision (prayer-room): end"]  # fmt: skip
# Three tasks sent the way a release from before the key prefix sent them: the default user, kombu's own names.
OLD_SEND = """
import os
from celery import Celery
url = os.environ.pop("CELERY_BROKER_URL").replace("//prayer-room:", "//:")
app = Celery(broker=url)
print(" ".join(app.send_task("prayer_room_api.tasks.ping").id for _ in range(3)))
"""


def test_provision_moves_an_older_servers_queued_tasks_under_the_prefix_and_the_worker_runs_them(server):
    """Redis as a server provisioned before the ACL user has it (requirepass, kombu's keys without the prefix), with
    three tasks queued under the old names: the next provision moves them under the prefix before the ACL takes
    effect, and the worker runs them. The control: they were queued under the old name before."""
    block = " ".join(shlex.quote(line) if "$pw" not in line else f'"{line}"' for line in OLD_REDIS_BLOCK)
    server.ssh(
        f"pw={REDIS_PASSWORD}; sed -i '/^# --- fab provision (prayer-room): begin$/,/^# --- fab provision"
        f" (prayer-room): end$/d' /etc/redis/redis.conf && printf '%s\\n' {block} >> /etc/redis/redis.conf"
        " && systemctl restart redis-server"
    )
    task_ids = in_app(server, f"-c {shlex.quote(OLD_SEND)}").split()
    assert len(task_ids) == 3, task_ids
    assert redis_probe(server, [["LLEN", "celery"]], login="default") == [":3"]  # the control: the old name
    started = time.monotonic()
    out = expect_ok(fab(server, "provision"))
    report["provision moving an older server's keys, seconds"] = round(time.monotonic() - started, 1)
    moved = re.search(r"moved (\d+) key\(s\) of the broker under prayer-room:", out)
    assert moved and int(moved.group(1)) >= 2, out[-3000:]  # the queue and its binding table at least
    results = [["EXISTS", f"prayer-room:celery-task-meta-{task_id}"] for task_id in task_ids]
    deadline = time.monotonic() + 180
    while redis_probe(server, results) != [":1"] * 3:
        assert time.monotonic() < deadline, f"the moved tasks did not run: {redis_probe(server, results)}"
        time.sleep(1)
    assert redis_probe(server, [["LLEN", "celery"]], login="default")[0].startswith("AUTH -WRONGPASS")
