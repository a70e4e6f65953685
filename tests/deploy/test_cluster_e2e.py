"""`fab provision --env cluster` on four fresh Debian 13 containers (tests/support/cluster.py), over real SSH.

The tests share one cluster, booted and provisioned once for the module, and run in file order (test_0x_...):
provision, provision again (nothing changes), then what each host got for its roles. Tests appended below
(deploys through the balancer) use the same `cluster` fixture: `cluster.provisioned()` makes sure of the first.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from deploy.config import load_config
from deploy.on_server.common import read_env_file
from prayer_room_api.beat import LOCK_KEY
from tests.deploy.target import Clone, RequestLoop, http_get, http_request
from tests.support import capture
from tests.support.capture import Capture
from tests.support.cluster import Cluster
from tests.support.nspawn import missing_tools
from tests.support.units import exposure, measured_in, release_of

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
APP_USER = "prayer-room"
ENV_FILE = "/srv/prayer-room/shared/env"
APP_HOSTS = ("web1", "web2", "app")

_missing = missing_tools() or capture.missing_tools()
pytestmark = [pytest.mark.deploy, pytest.mark.skipif(bool(_missing), reason=str(_missing))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    booted = Cluster.boot(tmp_path_factory.mktemp("cluster"))
    # Before the first provision: it renders the web hosts' nginx, whose write rate limit (off here: the request
    # loops POST far more than a visitor may) a deploy does not change.
    booted.configure(SETTINGS)
    yield booted
    booted.destroy()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "cluster-e2e-timings.json").write_text(json.dumps(booted.timings, indent=1) + "\n")


def env_values(cluster: Cluster, name: str) -> dict[str, str]:
    return read_env_file(cluster[name].ssh(f"cat {ENV_FILE}").stdout)


def can_connect(address: str, port: int, timeout: float = 3) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def test_01_provision_sets_up_each_host_for_its_roles(cluster):
    result = cluster.provisioned()
    print(result.stdout)  # shown with -s, and on a failure
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    for name in ("lb", "web1", "web2", "app"):
        assert f"[{cluster.host(name)}] -> packages" in result.stdout  # each host's lines carry its name
    assert "provision cluster cluster: 4 of 4 hosts changed in " in result.stdout, result.stdout[-2000:]
    # The db host went first: its last step ended before any other host began.
    lines = result.stdout.splitlines()
    db_done = max(
        i for i, line in enumerate(lines) if line.startswith(f"[{cluster.host('app')}]   ") and "redis" in line
    )
    others = [
        i for i, line in enumerate(lines) for n in ("lb", "web1", "web2") if line.startswith(f"[{cluster.host(n)}]")
    ]
    assert db_done < min(others)

    values = {name: env_values(cluster, name) for name in APP_HOSTS}
    shared = ("SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL", "ALLOWED_HOSTS")
    for name in APP_HOSTS:
        assert {key: values[name][key] for key in shared} == {key: values["web1"][key] for key in shared}, name
    primary = values["web1"]
    assert f"@{cluster.app.address}:5432/" in primary["DATABASE_URL"]
    assert f"@{cluster.app.address}:6379/0" in primary["CELERY_BROKER_URL"]
    assert primary["ALLOWED_HOSTS"] == f"{cluster.lb.address},127.0.0.1,localhost"
    for secret in (primary["SECRET_KEY"], primary["DATABASE_URL"].split(":")[2].split("@")[0]):
        assert secret not in output
    assert cluster.web1.ssh(f"stat -c '%U:%G %a' {ENV_FILE}").stdout == f"root:{APP_USER} 640\n"
    # The backup timer on the primary only; supervisord on every app host.
    assert cluster.web1.ssh("systemctl is-enabled prayer-room-backup.timer", check=False).stdout.strip() == "enabled"
    assert cluster.web2.ssh("systemctl is-enabled prayer-room-backup.timer", check=False).returncode != 0
    for name in APP_HOSTS:
        assert cluster[name].ssh("systemctl is-active prayer-room").stdout.strip() == "active", name


def test_02_provision_again_changes_nothing(cluster):
    cluster.provisioned()
    snapshot = "md5sum /srv/prayer-room/shared/env /etc/prayer-room/* /etc/nginx/sites-enabled/* 2>/dev/null; true"
    before = {name: cluster[name].ssh(snapshot).stdout for name in ("lb", "web1", "web2", "app")}
    pids = {name: cluster[name].ssh("systemctl show -p MainPID --value prayer-room").stdout for name in APP_HOSTS}
    started = time.monotonic()
    result = cluster.fab("provision")
    cluster.timings["provision, second run"] = time.monotonic() - started
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "provision cluster cluster: nothing changed on its 4 hosts" in result.stdout, result.stdout[-3000:]
    assert "   changed  " not in result.stdout  # no step of any host
    assert {name: cluster[name].ssh(snapshot).stdout for name in before} == before
    assert {name: cluster[name].ssh("systemctl show -p MainPID --value prayer-room").stdout for name in pids} == pids


# RESP commands to the Redis of a redis:// or rediss:// URL (TLS checked against its ssl_ca_certs and address), one
# reply line each: PING, AUTH with the URL's user and password, PING, then the ARGS (each one command).
REDIS_COMMANDS = """
import socket, ssl, sys
from urllib.parse import parse_qs, unquote, urlsplit
url = urlsplit(sys.argv[1])
auth = [unquote(url.username).encode()] if url.username else []
commands = [[b"PING"], [b"AUTH", *auth, unquote(url.password or "").encode()], [b"PING"]]
commands += [arg.encode().split() for arg in sys.argv[2:]]
with socket.create_connection((url.hostname, url.port), timeout=5) as s:
    if url.scheme == "rediss":
        context = ssl.create_default_context(cafile=parse_qs(url.query)["ssl_ca_certs"][0])
        s = context.wrap_socket(s, server_hostname=url.hostname)
    f = s.makefile("rwb")
    for words in commands:
        try:
            f.write(b"*%d\\r\\n" % len(words) + b"".join(b"$%d\\r\\n%s\\r\\n" % (len(w), w) for w in words))
            f.flush()
            print(f.readline().decode(errors="replace").strip() or "(closed)")
        except OSError as exc:
            print(f"(closed: {exc})")
"""


def redis_commands(cluster: Cluster, name: str, url: str, *commands: str) -> list[str]:
    """REDIS_COMMANDS from host `name`: each reply's first word."""
    result = cluster[name].ssh(f"python3 -c {shlex.quote(REDIS_COMMANDS)} {shlex.quote(url)} {shlex.join(commands)}")
    return [line.split()[0] if line.split() else "" for line in result.stdout.splitlines()]


def test_03_an_app_host_reaches_postgresql_and_redis_with_its_env_files_urls(cluster):
    cluster.provisioned()
    database = cluster.web1.ssh(
        f"cd / && runuser -u {APP_USER} -- psql -tA \"$(sed -n 's/^DATABASE_URL=//p' {ENV_FILE})\""
        " -c 'select current_user, inet_server_addr()'"
    )
    assert database.stdout.strip() == f"prayer_room|{cluster.app.address}", database.stdout + database.stderr
    # Over TLS, checked against the cluster CA: the URL says so, and PostgreSQL refuses the same login without TLS.
    url = env_values(cluster, "web1")["DATABASE_URL"]
    assert "sslmode=verify-full" in url and "sslrootcert=/etc/prayer-room/cluster-ca.crt" in url
    plain = cluster.web1.ssh(
        f"cd / && runuser -u {APP_USER} -- psql {shlex.quote(url.replace('sslmode=verify-full', 'sslmode=disable'))}"
        " -c 'select 1'",
        check=False,
    )
    assert plain.returncode != 0 and "no encryption" in plain.stderr, plain.stderr
    # Redis: TLS only, checked against the cluster CA; the app's ACL user (the same as a single server's), which may
    # not run what the app never does, nor touch a key or channel outside the app's prefix (prayer-room:).
    broker = env_values(cluster, "web2")["CELERY_BROKER_URL"]
    assert broker.startswith(f"rediss://{APP_USER}:") and "ssl_cert_reqs=required" in broker
    forbidden = ("FLUSHALL", "FLUSHDB", "CONFIG GET *", "REPLICAOF NO ONE", "DEBUG SLEEP 0", "KEYS *", "MONITOR")
    outside = ("SET e2e:key 1", "GET e2e:key", "EVAL return(1) 1 e2e:key", "PUBLISH e2e:channel x", "ACL LIST")
    allowed = ("SET prayer-room:e2e 1", "EVAL return(1) 1 prayer-room:e2e")
    replies = redis_commands(cluster, "web2", broker, *allowed, *forbidden, *outside)
    assert replies[:5] == ["-NOAUTH", "+OK", "+PONG", "+OK", ":1"], replies
    refused = replies[5:]
    assert all(reply in ("-NOPERM", "-ERR") for reply in refused) and len(refused) == len(forbidden + outside), replies
    assert refused[len(forbidden) :] == ["-NOPERM"] * len(outside), replies
    # Without TLS (the URL as it was before): no Redis answer at all, whatever it sends.
    plain = redis_commands(cluster, "web2", broker.replace("rediss://", "redis://").split("?")[0])
    assert not {"-NOAUTH", "+OK", "+PONG"} & set(plain) and len(plain) == 3, plain


def reaches_the_db(cluster: Cluster, name: str) -> bool:
    """Whether host `name` opens a TCP connection to both PostgreSQL and Redis on the db host's address."""
    connect = f'socket.create_connection(("{cluster.app.address}", p), timeout=3)'
    probe = f"python3 -c 'import socket; [{connect} for p in (5432, 6379)]'"
    return cluster[name].ssh(probe, check=False).returncode == 0


def test_04_the_db_host_admits_postgresql_and_redis_from_the_app_hosts_only(cluster):
    cluster.provisioned()
    db = cluster.app.address
    # This machine is no host of the cluster (the containers see it as their gateway, 10.231.N.1).
    assert not can_connect(db, 5432) and not can_connect(db, 6379)
    assert can_connect(db, 22)  # SSH is never filtered
    assert reaches_the_db(cluster, "web2")  # an app host: admitted (pg_hba still wants the password)
    assert not reaches_the_db(cluster, "lb")  # the balancer runs no app: dropped
    rules = cluster.app.ssh("nft list table inet prayer_room").stdout
    assert "5432" in rules and "policy drop" in rules
    assert cluster.app.ssh("systemctl is-enabled prayer-room-firewall").stdout.strip() == "enabled"
    listening = cluster.app.ssh("ss -Hltn").stdout
    assert f"{db}:5432" in listening and f"{db}:6379" in listening


def test_04a_the_db_hosts_firewall_fails_closed(cluster):
    """Stopping the firewall unit leaves the ports closed; without its table Redis and PostgreSQL do not start. The
    positive control: the old unit's stop (`nft delete table`) opened them to any host."""
    cluster.provisioned()
    db, app = cluster.app.address, cluster.app
    postgres = app.ssh("systemctl list-units --plain --no-legend 'postgresql@*'").stdout.split()[0]
    services = f"redis-server {postgres}"
    try:
        app.ssh("systemctl stop prayer-room-firewall")
        assert app.ssh("systemctl is-active prayer-room-firewall", check=False).stdout.strip() == "inactive"
        assert not can_connect(db, 5432) and not can_connect(db, 6379) and not reaches_the_db(cluster, "lb")
        assert reaches_the_db(cluster, "web1")
        app.ssh("systemctl restart redis-server")  # it wants the firewall: starting it starts the firewall
        assert app.ssh("systemctl is-active prayer-room-firewall").stdout.strip() == "active"
        app.ssh("nft delete table inet prayer_room")  # what the old unit's stop did
        assert can_connect(db, 5432) and can_connect(db, 6379)  # the control: open to this machine
        for unit in services.split():
            assert app.ssh(f"systemctl restart {unit}", check=False).returncode != 0, unit  # no table: no start
        assert not can_connect(db, 5432) and not can_connect(db, 6379) and not reaches_the_db(cluster, "web1")
    finally:
        # Redis's unit restarts on failure until its start limit: reset-failed lets it start again.
        back = app.ssh(
            f"systemctl restart prayer-room-firewall && systemctl reset-failed {services}; systemctl start {services}",
            check=False,
        )
    assert back.returncode == 0, back.stdout + back.stderr
    assert reaches_the_db(cluster, "web1") and not reaches_the_db(cluster, "lb")
    assert not can_connect(db, 5432) and not can_connect(db, 6379)
    for service in measured_in(__name__):  # the firewall's unit, as sandboxed as a loader of nftables rules can be
        measured, out = exposure(app, service.unit)
        cluster.timings[f"systemd-analyze security {service.unit}"] = measured
        assert measured <= service.bound[release_of(app)], out


def test_05_postgresql_and_redis_are_on_the_db_host_only_and_the_balancer_runs_no_app(cluster):
    cluster.provisioned()
    installed = "dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n' postgresql redis-server nginx 2>/dev/null; true"
    packages = {
        name: {
            line.split()[0] for line in cluster[name].ssh(installed).stdout.splitlines() if line.split()[1:] == ["ii"]
        }
        for name in ("lb", "web1", "web2", "app")
    }
    assert packages == {
        "lb": {"nginx"},
        "web1": {"nginx"},
        "web2": {"nginx"},
        "app": {"postgresql", "redis-server"},
    }
    bare = cluster.lb.ssh(
        f"getent passwd {APP_USER}; ls -d /srv/prayer-room 2>/dev/null; ls /etc/prayer-room", check=False
    )
    assert bare.stdout.split() == ["cluster-ca.crt"]  # what it checks the web hosts' certificates against
    assert cluster.app.ssh("ls /etc/nginx/sites-enabled 2>/dev/null; true").stdout.strip() == ""


def http_status(address: str, host: str | None = None) -> int | None:
    """The status line's code of GET / at `address` (with Host `host`), None when the server closed without one."""
    with socket.create_connection((address, 80), timeout=10) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host or address}\r\nConnection: close\r\n\r\n".encode())
        answer = sock.recv(200).decode(errors="replace")
    return int(answer.split()[1]) if answer.startswith("HTTP/") else None


def test_06_the_balancer_proxies_to_the_web_hosts_nginx(cluster):
    cluster.provisioned()
    # Nothing is deployed: each web host's nginx answers 502 (no web program), and so does the balancer.
    assert http_status(cluster.lb.address) == 502
    assert http_status(cluster.lb.address, host="unknown.example") is None  # 444: closed without an answer
    assert http_status(cluster.web1.address, host=cluster.lb.address) == 502
    assert http_status(cluster.web1.address) is None  # the web hosts answer for the site's name only
    # Both web hosts got the balancer's requests, and log the client (this machine, as the balancer saw it): they
    # believe the balancer's X-Forwarded-For.
    client = cluster.lb.gateway
    seen = {
        name: cluster[name].ssh(f"grep -c '^{client} ' /var/log/nginx/access.log", check=False).stdout.strip()
        for name in ("web1", "web2")
    }
    assert all(int(count or 0) > 0 for count in seen.values()), seen


def test_07_the_db_host_comes_back_from_a_reboot_listening_behind_its_firewall(cluster):
    cluster.provisioned()
    db = cluster.app.address
    started = time.monotonic()
    cluster.app.reboot()
    listening = ""
    while time.monotonic() - started < 120:
        listening = cluster.app.ssh("ss -Hltn", check=False).stdout
        if f"{db}:5432" in listening and f"{db}:6379" in listening:
            break
        time.sleep(0.5)
    cluster.timings["db host reboot until listening"] = time.monotonic() - started
    assert f"{db}:5432" in listening and f"{db}:6379" in listening, listening
    assert "5432" in cluster.app.ssh("nft list table inet prayer_room").stdout  # loaded at boot by our unit
    assert not can_connect(db, 5432) and not can_connect(db, 6379)
    test_03_an_app_host_reaches_postgresql_and_redis_with_its_env_files_urls(cluster)


def test_08_provision_with_dash_h_sets_up_that_host_alone_from_the_primarys_env_file(cluster):
    cluster.provisioned()
    cluster.web2.ssh(f"sed -i 's/^SECRET_KEY=.*/SECRET_KEY=drifted/' {ENV_FILE}")
    result = cluster.fab("-H", cluster.host("web2"), "provision")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"provision {cluster.host('web2')}: 1 of 11 steps changed the server (env file)" in result.stdout
    assert "provision cluster cluster: 1 of 1 hosts changed" in result.stdout
    assert not any(
        line.startswith(f"[{cluster.host(n)}]") for line in result.stdout.splitlines() for n in ("web1", "app")
    )
    assert env_values(cluster, "web2")["SECRET_KEY"] == env_values(cluster, "web1")["SECRET_KEY"]


def test_09_a_failure_on_one_host_names_it_and_its_step_and_the_others_finish(cluster):
    cluster.provisioned()
    web2 = cluster.host("web2")
    cluster.web2.ssh("rm /etc/nginx/sites-enabled/prayer-room && echo 'not nginx;' > /etc/nginx/conf.d/broken.conf")
    try:
        result = cluster.fab("provision")
        assert result.returncode == 1
        error = (result.stdout + result.stderr).strip().splitlines()[-1]
        assert error.startswith(f"error: provision failed on {web2} (nginx): nginx refused the site on "), error
        assert "run provision again" in error
        for name in ("lb", "web1", "app"):
            assert f"provision {cluster.host(name)}: nothing changed" in result.stdout, result.stdout[-3000:]
    finally:
        cluster.web2.ssh("rm -f /etc/nginx/conf.d/broken.conf")
    again = cluster.fab("provision")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"provision {web2}: 1 of 11 steps changed the server (nginx)" in again.stdout
    assert "provision cluster cluster: 1 of 4 hosts changed" in again.stdout


KEYS = ((0, "CELERY_BROKER_URL"), (1, "CACHE_URL"))


def test_10_without_a_db_host_provision_installs_no_database_and_names_the_keys_the_primary_needs(cluster):
    """A managed PostgreSQL and Redis: the same hosts in another layout (so the cluster above is left as it was)."""
    cluster.provisioned()
    roles = {role: [] for role in ("web", "worker", "beat")}
    for name in ("web1", "web2"):
        for role in roles:
            roles[role].append(cluster.host(name))
    path = cluster.workdir / "managed.toml"
    lines = ["[environments.managed]", 'root = "/srv/managed"', 'etc = "/etc/managed"', "[environments.managed.roles]"]
    path.write_text("\n".join([*lines, *(f"{role} = {json.dumps(hosts)}" for role, hosts in roles.items())]) + "\n")
    try:
        result = cluster.fab("provision", "--env", "managed", "--config", str(path))
        assert result.returncode == 1
        error = (result.stdout + result.stderr).strip().splitlines()[-1]
        assert error.startswith(
            "error: the cluster managed has no db host: put DATABASE_URL, CELERY_BROKER_URL, CACHE_URL for your "
            f"PostgreSQL and Redis into {cluster.host('web1')}'s /srv/managed/shared/env (the primary's"
        ), error
        values = read_env_file(cluster.web1.ssh("cat /srv/managed/shared/env").stdout)  # there to be filled in
        assert "SECRET_KEY" in values and "DATABASE_URL" not in values
        assert cluster.web2.ssh("ls /srv/managed 2>/dev/null; true").stdout == ""  # no other host was touched
        # The operator fills them in with fab env --set: the primary's file only (web2 gets them from provision);
        # a key provision does not copy is refused naming web2 (before, both failed taking web2's deploy lock).
        env = ("env", "--env", "managed", "--config", str(path))
        own = cluster.fab(*env, "--set", "LOG_LEVEL=debug")
        error = (own.stdout + own.stderr).strip().splitlines()[-1]
        assert own.returncode == 1 and error.startswith(
            f"error: {cluster.host('web2')} not provisioned yet (no /srv/managed): before `fab provision`"
        ), error
        url = "postgres://app:pw@db.example:5432/app?sslmode=verify-full&sslrootcert=/etc/ssl/managed-ca.crt"
        urls = [f"DATABASE_URL={url}", *(f"{key}=rediss://:pw@redis.example:6379/{n}" for n, key in KEYS)]
        result = cluster.fab(*env, *(arg for item in urls for arg in ("--set", item)))
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        skipped = f"{cluster.host('web2')}: not provisioned yet; `fab provision` copies these"
        assert skipped in result.stdout, result.stdout
        values = read_env_file(cluster.web1.ssh("cat /srv/managed/shared/env").stdout)
        assert values["DATABASE_URL"] == url and values["CACHE_URL"] == "rediss://:pw@redis.example:6379/1"
        assert cluster.web2.ssh("ls /srv/managed 2>/dev/null; true").stdout == ""
    finally:
        cluster.web1.ssh("rm -rf /srv/managed /etc/managed")


# A PostgreSQL impostor: answers the SSLRequest, shows its own certificate, then asks for the password in clear (what
# a man in the middle who holds a certificate the client accepts gets) and writes what it receives to OUT.
ROGUE_POSTGRES = """
import socket, ssl, struct, sys
address, port, cert, key, out = sys.argv[1:6]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
with socket.create_server((address, int(port))) as server:
    while True:
        conn, _ = server.accept()
        try:
            conn.recv(8)
            conn.sendall(b"S")
            tls = context.wrap_socket(conn, server_side=True)
            length = struct.unpack("!I", tls.recv(4))[0]
            tls.recv(length - 4)
            tls.sendall(b"R" + struct.pack("!II", 8, 3))
            kind, length = tls.recv(1), struct.unpack("!I", tls.recv(4))[0]
            with open(out, "ab") as log:
                log.write(tls.recv(length - 4).rstrip(b"\\0") + b"\\n")
            tls.close()
        except (OSError, ssl.SSLError, struct.error):
            conn.close()
"""
ROGUE_PORT = 15432


def test_11_a_man_in_the_middle_with_another_certificate_gets_no_database_login(cluster):
    """An impostor at the db host's address with a certificate of another CA (naming that address): the app's
    client (sslmode=verify-full against the cluster CA) refuses it before sending anything. Positive control: with
    the URL as it was before (no sslmode: libpq's prefer, nothing verified), the same impostor receives the
    password."""
    cluster.provisioned()
    db = cluster.app.address
    cluster.app.ssh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=impostor"
        f" -addext subjectAltName=IP:{db} -keyout /root/rogue.key -out /root/rogue.crt 2>/dev/null"
        f" && cat > /root/rogue.py <<'EOF'\n{ROGUE_POSTGRES}\nEOF\n"
        f"rm -f /root/rogue.out && systemd-run --unit=e2e-rogue-postgres --collect python3 /root/rogue.py {db}"
        f" {ROGUE_PORT} /root/rogue.crt /root/rogue.key /root/rogue.out"
    )
    try:
        deadline = time.monotonic() + 30
        while not cluster.app.ssh(f"ss -Hltn 'sport = :{ROGUE_PORT}'").stdout.strip():
            assert time.monotonic() < deadline, "the impostor never listened"
            time.sleep(0.2)
        url = env_values(cluster, "web1")["DATABASE_URL"]
        password = url.split("://", 1)[1].split("@")[0].split(":", 1)[1]

        def login(target: str) -> subprocess.CompletedProcess:
            target = target.replace(f"{db}:5432", f"{db}:{ROGUE_PORT}")
            return cluster.web1.ssh(
                f"cd / && runuser -u {APP_USER} -- env PGCONNECT_TIMEOUT=10 psql {shlex.quote(target)} -c 'select 1'",
                check=False,
            )

        refused = login(url)
        assert refused.returncode != 0 and "certificate verify failed" in refused.stderr, refused.stderr
        assert cluster.app.ssh("cat /root/rogue.out 2>/dev/null; true").stdout == ""  # nothing reached it
        # NOTE: the URL as it was, without its query: with a sslrootcert, libpq's prefer and require verify the CA.
        control = login(url.split("?")[0])
        assert control.returncode != 0
        received = cluster.app.ssh("cat /root/rogue.out 2>/dev/null; true").stdout.split()
        assert received == [password], (received, control.stderr)  # the old way: the password
    finally:
        cluster.app.ssh("systemctl stop e2e-rogue-postgres; rm -f /root/rogue.*", check=False)


# The impostors' common start: TLS on ADDRESS:PORT with CERT and KEY, and log(), a line appended to OUT.
ROGUE_TLS_SERVER = """
import socket, ssl, sys
address, port, cert, key, out = sys.argv[1:6]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
def log(data):
    with open(out, "ab") as f:
        f.write(data + b"\\n")
"""


# A web host impostor: HTTPS on ADDRESS:PORT with its own certificate; it logs each refused handshake and each
# connection closed without a request (one line each), and each request it is sent, headers and body, to OUT, and
# answers 200 "impostor". (nginx completes the handshake, then checks the certificate and closes when it fails.)
ROGUE_WEB = (
    ROGUE_TLS_SERVER
    + """
import re
with socket.create_server((address, int(port))) as server:
    while True:
        conn, _ = server.accept()
        conn.settimeout(10)
        try:
            tls = context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log(b"handshake refused: " + str(exc).encode())
            conn.close()
            continue
        try:
            data = b""
            while b"\\r\\n\\r\\n" not in data and (chunk := tls.recv(65536)):
                data += chunk
            length = re.search(rb"(?im)^content-length: *(\\d+)", data)
            while length and len(data.partition(b"\\r\\n\\r\\n")[2]) < int(length[1]) and (chunk := tls.recv(65536)):
                data += chunk
            if not data:
                log(b"closed without a request")
                tls.close()
                continue
            log(b"request: " + data)
            tls.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 9\\r\\nConnection: close\\r\\n\\r\\nimpostor\\n")
            tls.close()
        except (OSError, ssl.SSLError) as exc:
            log(b"failed: " + str(exc).encode())
"""
)
WEB_TLS_PORT = 8443
WEB_TLS_NAME = "web.prayer-room.cluster"


def test_12_a_web_host_impostor_with_another_certificate_gets_no_request_from_the_balancer(cluster):
    """An impostor at web2's address and TLS port (its nginx stopped; web1's too, so that every request goes to it)
    with a certificate of another CA naming the web hosts' name and web2's address: the balancer's nginx
    (proxy_ssl_verify on, the cluster CA) refuses the handshake and answers 502; the request, its body, never reaches
    the impostor. Positive control: the same site with `proxy_ssl_verify off` sends the impostor the request, body
    and all."""
    cluster.provisioned()
    web2, lb = cluster.web2, cluster.lb
    rogue = "/root/rogue-web"
    web2.ssh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=impostor"
        f" -addext subjectAltName=IP:{web2.address},DNS:{WEB_TLS_NAME} -keyout {rogue}.key -out {rogue}.crt"
        f" 2>/dev/null && cat > {rogue}.py <<'EOF'\n{ROGUE_WEB}\nEOF\n"
    )
    site = lb.ssh(f"cat {BALANCER_SITE}").stdout
    assert "proxy_ssl_verify on;" in site and f"server {web2.address}:{WEB_TLS_PORT} " in site
    errors_before = int(lb.ssh("wc -l < /var/log/nginx/error.log").stdout)

    def post(marker: str) -> tuple[int | None, str]:
        return http_request(f"{front(cluster)}/api/requests/", {"content": marker}, timeout=15)

    def received() -> str:
        return web2.ssh(f"cat {rogue}.out 2>/dev/null; true").stdout

    try:
        for name in ("web1", "web2"):
            cluster[name].ssh("systemctl stop nginx")
        web2.ssh(
            f"rm -f {rogue}.out && systemd-run --unit=e2e-rogue-web --collect python3 {rogue}.py {web2.address}"
            f" {WEB_TLS_PORT} {rogue}.crt {rogue}.key {rogue}.out"
        )
        deadline = time.monotonic() + 30
        while not web2.ssh(f"ss -Hltn 'sport = :{WEB_TLS_PORT}'").stdout.strip():
            assert time.monotonic() < deadline, "the impostor never listened"
            time.sleep(0.2)
        marker = f"sent to the impostor {time.time()}"
        status, body = post(marker)
        assert status == 502 and "impostor" not in body, (status, body)
        log = received()
        closed = ("handshake refused", "closed without", "failed")
        refused = [line for line in log.splitlines() if line.startswith(closed)]
        cluster.timings["balancer impostor: connections the balancer closed without a request"] = len(refused)
        assert refused and "request: " not in log and marker not in log, log  # the balancer came; nothing was sent
        errors = lb.ssh(f"tail -n +{errors_before + 1} /var/log/nginx/error.log").stdout
        assert "upstream SSL certificate verify error" in errors, errors[-2000:]

        # The positive control: verification off, the same impostor gets the request, body and all.
        lb.ssh(f"sed -i 's/proxy_ssl_verify on;/proxy_ssl_verify off;/' {BALANCER_SITE} && systemctl reload nginx")
        control = f"sent to the impostor, not verified {time.time()}"
        deadline = time.monotonic() + 30
        while (answer := post(control)) != (200, "impostor\n"):  # until the reloaded workers take the requests
            assert time.monotonic() < deadline, answer
            time.sleep(0.5)
        log = received()
        assert "request: POST /api/requests/ HTTP/1." in log and control in log, log[-2000:]
        cluster.timings["balancer impostor, verification off: requests it was sent"] = log.count("request: POST ")
    finally:
        lb.ssh(f"sed -i 's/proxy_ssl_verify off;/proxy_ssl_verify on;/' {BALANCER_SITE} && systemctl reload nginx")
        web2.ssh(f"systemctl stop e2e-rogue-web; rm -f {rogue}.*", check=False)
        for name in ("web1", "web2"):
            cluster[name].ssh("systemctl start nginx")
    assert lb.ssh(f"cat {BALANCER_SITE}").stdout == site
    for name in ("web1", "web2"):  # their own nginx answers again (502: nothing is deployed yet)
        assert http_status(cluster[name].address, host=lb.address) == 502, name


# --- deploys: the cluster provisioned above, through the balancer -------------------------------------------

SETTINGS = """
web_workers = 1
worker_concurrency = 1
health_timeout = 40
write_rate_per_minute = 0
env = { THROTTLE_SUBMIT = "1000000/hour", THROTTLE_PRAYED = "1000000/hour" }
"""
UNHEALTHY_MARK = "/etc/prayer-room-e2e-unhealthy"  # the test's release reports unhealthy where this exists
LEADER = (
    "SELECT host(a.client_addr) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = "
    "'advisory' AND l.granted AND l.classid = {} AND l.objid = {} AND l.objsubid = 2".format(*LOCK_KEY)
)


@pytest.fixture(scope="module")
def clone(cluster):
    assert cluster.provisioned().returncode == 0
    return Clone(cluster.workdir / "repo")


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr}"
    return result.stdout


def live_release(cluster: Cluster, name: str) -> str:
    return cluster[name].ssh("readlink /srv/prayer-room/current").stdout.strip().rsplit("/", 1)[-1]


def sql(cluster: Cluster, query: str) -> str:
    """A query on the cluster's database, as postgres on the db host (nobody else reaches it from here)."""
    return cluster.app.ssh(f"cd / && runuser -u postgres -- psql -X -tA prayer_room -c {shlex.quote(query)}").stdout


def front(cluster: Cluster) -> str:
    return f"http://{cluster.lb.address}"


def request_loop(cluster: Cluster, path: str = "/health/") -> RequestLoop:
    """GETs of `path` and the API's two POSTs, back to back through the balancer."""
    sql(
        cluster,
        "INSERT INTO prayer_room_api_location (name, slug, is_active, created_at)"
        " VALUES ('Cluster e2e', 'cluster-e2e', true, now()) ON CONFLICT DO NOTHING",
    )
    request_id = sql(
        cluster,
        "INSERT INTO prayer_room_api_prayerrequest (content, name, type, location_id, created_at, updated_at,"
        " prayer_count, approved_at, response) SELECT 'pray for the cluster', 'e2e', 'prayer', id, now(), now(),"
        " 0, now(), '' FROM prayer_room_api_location WHERE slug = 'cluster-e2e' RETURNING id",
    ).split()[0]
    base = f"{front(cluster)}/api/requests/"
    submit = {"type": "prayer", "content": "a request sent during a cluster deploy", "location": "cluster-e2e"}
    return RequestLoop(front(cluster) + path, posts=((base, submit), (f"{base}{request_id}/prayed/", {})))


def summary_seconds(output: str, step: str) -> float:
    """The seconds the closing summary gives the steps whose names start with `step`, added up."""
    found = re.findall(rf"^  [ !] +([\d.]+) s  {re.escape(step)}", output, re.M)
    return sum(map(float, found))


def test_20_the_first_deploy_makes_every_host_live_with_its_roles_programs(cluster, clone):
    started = time.monotonic()
    out = ok(cluster.fab("deploy", "--repo", str(clone.path)))
    cluster.timings["deploy, first (3 app hosts; virtualenvs built in parallel)"] = time.monotonic() - started
    release = live_release(cluster, "web1")
    assert f"{release} is live on 3 hosts" in out
    assert {name: live_release(cluster, name) for name in APP_HOSTS} == dict.fromkeys(APP_HOSTS, release)
    expected = {
        "web1": {"web-1", "web-2", "beat"},
        "web2": {"web-1", "web-2", "worker", "beat"},
        "app": {"worker"},
    }
    for name, programs in expected.items():
        states = cluster[name].ssh("supervisorctl status", check=False).stdout.splitlines()
        running = {line.split()[0].split(":")[-1] for line in states if " RUNNING " in line}
        assert running == programs and len(states) == len(programs), (name, states)
    # Migrated once, on the primary; each worker host pinged through its own queue.
    assert out.count("-> prepare: migrate, seed_schedules") == 1
    for name in ("web2", "app"):
        assert re.search(rf"^\[{re.escape(cluster[name].address)} *\]    answered by ", out, re.M), out[-4000:]
        conf = cluster[name].ssh("cat /etc/prayer-room/programs.conf").stdout
        assert f'WORKER_QUEUES="celery,host.{cluster[name].address}"' in conf
    status, body = http_get(f"{front(cluster)}/health/")
    assert status == 200 and json.loads(body)["release"] == release, body
    assert len(sql(cluster, LEADER).split()) == 1  # one beat leads, on web1 or web2


# A Redis impostor: TLS on ADDRESS:PORT with its own certificate; it answers every command (+PONG to PING, +OK to the
# rest), logs each one it receives, words joined by spaces, and each refused handshake, to OUT.
ROGUE_REDIS = (
    ROGUE_TLS_SERVER
    + """
import threading
def serve(conn):
    try:
        tls = context.wrap_socket(conn, server_side=True)
    except (OSError, ssl.SSLError) as exc:
        log(b"handshake refused: " + str(exc).encode())
        return conn.close()
    f = tls.makefile("rwb")
    try:
        while (line := f.readline()).startswith(b"*"):
            words = [f.read(int(f.readline()[1:]) + 2)[:-2] for _ in range(int(line[1:]))]
            log(b" ".join(words))
            f.write(b"+PONG\\r\\n" if words[0].upper() == b"PING" else b"+OK\\r\\n")
            f.flush()
    except (OSError, ssl.SSLError, ValueError):
        pass
    tls.close()
with socket.create_server((address, int(port))) as server:
    while True:
        conn, _ = server.accept()
        conn.settimeout(10)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
)
# The app's two Redis clients, from its release's virtualenv, on the URL ARGV[1]: redis-py (Django's cache and
# Celery's result backend build theirs with it) and kombu (Celery's broker). One line each: ok or refused: why.
APP_REDIS_CLIENTS = """
import sys
import kombu, redis
url = sys.argv[1]
try:
    redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5).ping()
    print("redis-py ok")
except Exception as exc:
    print("redis-py refused:", type(exc).__name__, str(exc).replace(chr(10), " "))
try:
    with kombu.Connection(url, connect_timeout=5) as connection:
        connection.connect()
    print("kombu ok")
except Exception as exc:
    print("kombu refused:", type(exc).__name__, str(exc).replace(chr(10), " "))
"""
ROGUE_REDIS_PORTS = {"another CA": 16379, "the cluster CA, a web host's name": 16380}
# The positive controls: what each impostor needs weakened in the URL to be accepted.
ROGUE_REDIS_WEAKENED = {
    "another CA": ("ssl_cert_reqs=required", "ssl_cert_reqs=none"),
    "the cluster CA, a web host's name": ("ssl_check_hostname=true", "ssl_check_hostname=false"),
}


def test_20a_a_redis_impostor_gets_no_login_from_the_apps_redis_clients(cluster):
    """Two impostors at the db host's address: one with a certificate of another CA naming that address, one with a
    certificate of the cluster CA naming another host (web1's own, which its root holds: a web host taken over
    posing as the db host). The app's Redis clients (redis-py and kombu from the live release's virtualenv, the
    broker URL of web2's env file pointed at the impostor's port) refuse both before sending anything. Positive
    controls, the same URL weakened: ssl_cert_reqs=none lets the first impostor read AUTH with the app's password;
    ssl_check_hostname=false lets the second one read it."""
    db, app = cluster.app.address, cluster.app
    web_certificate = cluster.web1.ssh("cat /etc/prayer-room/tls/web.crt /etc/prayer-room/tls/web.key").stdout
    assert "BEGIN CERTIFICATE" in web_certificate and "PRIVATE KEY" in web_certificate
    rogue = "/root/rogue-redis"
    app.ssh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=impostor"
        f" -addext subjectAltName=IP:{db} -keyout {rogue}-other.key -out {rogue}-other.crt 2>/dev/null"
        f" && cat > {rogue}-web.pem <<'EOF'\n{web_certificate}EOF\n"
        f"cat > {rogue}.py <<'EOF'\n{ROGUE_REDIS}\nEOF\n"
    )
    certificates = {"another CA": (f"{rogue}-other.crt", f"{rogue}-other.key"),
                    "the cluster CA, a web host's name": (f"{rogue}-web.pem", f"{rogue}-web.pem")}  # fmt: skip
    url = env_values(cluster, "web2")["CELERY_BROKER_URL"]
    assert "ssl_cert_reqs=required" in url and "ssl_check_hostname=true" in url, url
    password = unquote(urlsplit(url).password or "")
    login = f"AUTH {APP_USER} {password}"

    def clients(target: str) -> list[str]:
        python = "/srv/prayer-room/current/.venv/bin/python"
        result = cluster.web2.ssh(
            f"cd / && runuser -u {APP_USER} -- {python} -c {shlex.quote(APP_REDIS_CLIENTS)} {shlex.quote(target)}",
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    def received(what: str) -> str:
        return app.ssh(f"cat {rogue}-{ROGUE_REDIS_PORTS[what]}.out 2>/dev/null; true").stdout

    try:
        for what, port in ROGUE_REDIS_PORTS.items():
            cert, key = certificates[what]
            app.ssh(
                f"rm -f {rogue}-{port}.out && systemd-run --unit=e2e-rogue-redis-{port} --collect python3 {rogue}.py"
                f" {db} {port} {cert} {key} {rogue}-{port}.out"
            )
        deadline = time.monotonic() + 30
        while len(app.ssh("ss -Hltn 'sport = :16379 or sport = :16380'").stdout.splitlines()) < 2:
            assert time.monotonic() < deadline, "the impostors never listened"
            time.sleep(0.2)
        outcomes = {}
        for what, port in ROGUE_REDIS_PORTS.items():
            target = url.replace(f"@{db}:6379/", f"@{db}:{port}/")
            answers = clients(target)
            outcomes[what] = answers
            assert [line.split(" ", 2)[:2] for line in answers] == [["redis-py", "refused:"], ["kombu", "refused:"]]
            assert all("certificate verify failed" in line.lower() for line in answers), answers
            if what == "another CA":
                assert all("self-signed certificate" in line or "unable to get" in line for line in answers), answers
            else:
                assert all("IP address mismatch" in line for line in answers), answers
            log = received(what)
            assert login not in log and password not in log and "AUTH" not in log, log  # nothing but the handshake
            assert "handshake refused" in log, log  # each client did reach it
            cluster.timings[f"redis impostor ({what}): handshakes refused"] = log.count("handshake refused")
            # The positive control: the URL weakened, the same impostor is accepted and reads the login.
            control = clients(target.replace(*ROGUE_REDIS_WEAKENED[what]))
            assert control == ["redis-py ok", "kombu ok"], control
            log = received(what)
            cluster.timings[f"redis impostor ({what}), the URL weakened: logins it read"] = log.count(login)
            assert log.count(login) >= 2, log  # at least one AUTH from each client, password and all
        print(outcomes)
    finally:
        app.ssh(f"systemctl stop e2e-rogue-redis-16379 e2e-rogue-redis-16380; rm -f {rogue}*", check=False)


def test_21_a_rolling_deploy_through_the_balancer_loses_no_request(cluster, clone):
    before = live_release(cluster, "web1")
    clone.commit_file("project/prayer_room_api/e2e_cluster.txt", "second\n", "a change for the rolling deploy")
    addresses = [cluster[name].address for name in ("lb", "web1", "web2", "app")]
    with Capture(cluster.workdir / "rolling-deploy.pcap", addresses) as pcap:
        redis_password = send_the_redis_password_in_clear(cluster)  # the positive control
        with request_loop(cluster) as loop:
            started = time.monotonic()
            result = cluster.fab("deploy", "--repo", str(clone.path))
            cluster.timings["deploy, code change (3 app hosts)"] = time.monotonic() - started
            loop.wait_for_more(3)  # requests after the deploy: they meet the new release
        # Every packet read before the capture stops: the control's is.
        control = pcap.wait_for(f"AUTH {APP_USER} {redis_password}".encode())
    out = ok(result)
    assert control, "the capture never showed the positive control's AUTH"
    nothing_in_clear_but_the_control(cluster, pcap, redis_password)
    after = live_release(cluster, "web1")
    assert after != before and {live_release(cluster, n) for n in APP_HOSTS} == {after}
    assert "virtualenv venvs/" in out and "reused" in out
    cluster.timings["rolling deploy: GET and POST answered"] = loop.ok + loop.posted
    cluster.timings["rolling deploy: failed requests"] = len(loop.failures)
    cluster.timings["rolling deploy: slowest request"] = loop.slowest
    assert loop.failures == [], loop.failures[:10]
    assert loop.ok > 20 and loop.posted > 20 and after in loop.releases


def send_the_redis_password_in_clear(cluster: Cluster) -> str:
    """What a client of the plain configuration did first (redis://, AUTH on connect): web2 sends AUTH with the app's
    password to the db host's Redis port in clear. Redis (TLS only) refuses it, but it has crossed the network."""
    url = urlsplit(env_values(cluster, "web2")["CELERY_BROKER_URL"])
    password = unquote(url.password or "")
    command = f"AUTH {APP_USER} {password}\r\n"
    connect = f"s = socket.create_connection(({url.hostname!r}, {url.port}))"
    send = f"import socket; {connect}; s.sendall({command!r}.encode()); s.recv(10)"
    cluster.web2.ssh(f"python3 -c {shlex.quote(send)}", check=False)
    return password


def nothing_in_clear_but_the_control(cluster: Cluster, pcap: Capture, redis_password: str) -> None:
    """The capture between the cluster's hosts holds PostgreSQL, Redis and balancer traffic, and in clear none of:
    the database password, SECRET_KEY, SQL, a task message, an HTTP request (the loop's POST bodies); the Redis
    password exactly as often as the control's plain AUTH carries it. The secrets are read from the servers."""
    values = env_values(cluster, "web1")
    db_password = unquote(urlsplit(values["DATABASE_URL"]).password or "")
    secret_key = values["SECRET_KEY"]
    # The Redis password is the one the db host's Redis has (its ACL user's).
    assert cluster.app.ssh(f"grep -cF {shlex.quote('>' + redis_password)} /etc/redis/redis.conf").stdout.strip() == "1"
    assert all(len(secret) >= 16 for secret in (db_password, secret_key, redis_password))
    counts = {port: pcap.packets(f"tcp port {port}") for port in (5432, 6379, 8443)}
    for port, count in counts.items():
        cluster.timings[f"capture: packets to/from port {port}"] = count
    assert all(counts.values()), counts  # it saw the cluster's traffic: the SQL, the tasks, the requests
    data = pcap.data()
    cluster.timings["capture: bytes"] = len(data)
    cluster.timings["capture: packets"] = pcap.packets("ip")
    control = f"AUTH {APP_USER} {redis_password}".encode()
    # The positive control: the one plain AUTH, password and all, is in the capture (the detector works); a
    # retransmission would carry it twice, so the password is compared with the control's own count.
    cluster.timings["capture: the control's AUTH"] = data.count(control)
    assert data.count(control) >= 1
    needles = {
        "the Redis password (beyond the control)": redis_password.encode(),
        "the database password": db_password.encode(),
        "SECRET_KEY": secret_key.encode(),
        "SQL": b"SELECT ",
        "SQL (writes)": b"INSERT INTO ",
        "SQL (updates)": b"UPDATE ",
        "a table name": b"prayer_room_api_",
        "a task name": b"prayer_room_api.",
        "a Celery message": b"delivery_info",
        "a task's headers": b'"argsrepr"',
        "an HTTP request": b"HTTP/1.",
        "the request loop's POST": b"a request sent during a cluster deploy",
    }
    seen = {what: data.count(needle) for what, needle in needles.items()}
    for what, count in seen.items():
        cluster.timings[f"capture: occurrences of {what}"] = count
    assert seen == {**dict.fromkeys(needles, 0), "the Redis password (beyond the control)": data.count(control)}, seen


def test_22_a_failed_verification_on_one_web_host_rolls_every_host_back(cluster, clone):
    live = live_release(cluster, "web1")
    views = clone.path / "project/prayer_room_api/views.py"
    broken = "import os\n" + views.read_text().replace(
        "    healthy = all(",
        f'    if os.path.exists("{UNHEALTHY_MARK}"):\n        checks["e2e"] = "unavailable"\n    healthy = all(',
    )
    clone.commit_file("project/prayer_room_api/views.py", broken, "unhealthy where the e2e mark exists")
    cluster.web2.ssh(f"touch {UNHEALTHY_MARK}")
    try:
        with request_loop(cluster, "/api/requests/") as loop:
            started = time.monotonic()
            result = cluster.fab("deploy", "--repo", str(clone.path))
            elapsed = time.monotonic() - started
        assert result.returncode == 1, result.stdout[-4000:]
        line = result.stderr.strip()
        assert line.startswith("error: ") and len(line.splitlines()) == 1, result.stderr
        assert f"failed on {cluster.web2.address}" in line and f"every host was rolled back to {live}" in line, line
        assert {name: live_release(cluster, name) for name in APP_HOSTS} == dict.fromkeys(APP_HOSTS, live)
        failed_release = clone.git("rev-parse", "HEAD")[:12]
        for name in APP_HOSTS:
            assert failed_release not in cluster[name].ssh("ls /srv/prayer-room/releases").stdout, name
        status, body = http_get(f"{front(cluster)}/health/")
        assert status == 200 and json.loads(body)["release"] == live
        cluster.timings["failed deploy, whole command"] = elapsed
        cluster.timings["failed deploy: rolling every host back"] = summary_seconds(result.stdout, "roll ")
        cluster.timings["failed deploy: failed API requests"] = len(loop.failures)
        cluster.timings["failed deploy: slowest API request"] = loop.slowest
        assert summary_seconds(result.stdout, "roll ") > 0
        assert loop.failures == [], loop.failures[:10]
    finally:
        cluster.web2.ssh(f"rm -f {UNHEALTHY_MARK}")
        clone.revert_head()


def test_23_status_logs_and_restart_by_role(cluster):
    live = live_release(cluster, "web1")
    table = ok(cluster.fab("status"))
    for name, program in (("web1", "beat"), ("web2", "worker"), ("app", "worker")):
        assert re.search(rf"^{re.escape(cluster[name].address)}\s+\S+\s+{live}\s+{program}\s+RUNNING", table, re.M), (
            table
        )
    assert f"{cluster.lb.address}: balancer (no programs)" in table
    assert f"balancer {cluster.lb.address}: sends requests to {cluster.web1.address}, {cluster.web2.address}" in table
    assert "ALERT balancer" not in table, table
    assert "schedules (beat, DatabaseScheduler):" in table
    logs = ok(cluster.fab("logs", "--role", "worker", "--lines", "20"))
    prefixes = {line.split(" | ", 1)[0] for line in logs.splitlines() if " | " in line}
    assert prefixes == {cluster.web2.address, cluster.app.address}, prefixes
    out = ok(cluster.fab("restart", "--role", "worker"))
    assert f"restarted on {cluster.web2.address}, {cluster.app.address}" in out


# What `fab shell` runs on its stdin: where it runs, as whom, in which release, with which settings and database
# connection (TLS seen by PostgreSQL itself), an ORM count, and the SECRET_KEY's hash (never the key). One line each,
# "probe|KEY|VALUE".
SHELL_PROBE = """
import hashlib, os, pwd, socket
from django.conf import settings
from django.db import connection
from django_celery_beat.models import PeriodicTask
connection.ensure_connection()
cursor = connection.cursor()
cursor.execute("SELECT ssl, inet_server_addr() FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
tls, server = cursor.fetchone()
show = lambda key, value: print(f"probe|{key}|{value}")
show("host", socket.gethostname())
show("user", pwd.getpwuid(os.getuid()).pw_name)
show("cwd", os.getcwd())
show("release", settings.RELEASE)
show("DJANGO_SETTINGS_MODULE", os.environ.get("DJANGO_SETTINGS_MODULE"))
show("PRAYER_ROOM_ENV_FILE", os.environ.get("PRAYER_ROOM_ENV_FILE"))
show("database", f"{connection.settings_dict['HOST']} {connection.get_connection_params().get('sslmode')}")
show("server", f"{server} tls={tls}")
show("periodic tasks", PeriodicTask.objects.count())
show("secret key sha256", hashlib.sha256(settings.SECRET_KEY.encode()).hexdigest())
"""


def timed_fab(cluster: Cluster, label: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = cluster.fab(*args, stdin=stdin)
    cluster.timings[label] = time.monotonic() - started
    return result


def test_23a_manage_and_shell_run_on_the_primary_as_the_app_user_with_the_programs_environment(cluster):
    """`fab shell` (a script on stdin) runs on the primary, the first web host of deploy.toml's roles, as the app
    user in the live release, with the env a web program there runs with: the db host's PostgreSQL over TLS.
    `fab manage` passes manage.py's exit code through; fab prints none of the env file's secrets."""
    primary = next(name for name, roles in cluster.roles.items() if "web" in roles)
    db = next(name for name, roles in cluster.roles.items() if "db" in roles)
    assert load_config(cluster.config_path, "cluster").primary == cluster.host(primary)
    live = live_release(cluster, primary)
    assert live, "no live release on the primary: test_20's deploy runs first"

    shell = timed_fab(cluster, "fab shell (a script on stdin, on the primary)", "shell", stdin=SHELL_PROBE)
    out = ok(shell)
    probe = dict(line.split("|", 2)[1:] for line in out.splitlines() if line.startswith("probe|"))
    program = cluster[primary].ssh("supervisorctl pid prayer-room:web-1").stdout.strip()
    environ = cluster[primary].ssh(f"tr '\\0' '\\n' < /proc/{program}/environ").stdout.splitlines()
    program_env = dict(line.split("=", 1) for line in environ if "=" in line)
    values = env_values(cluster, primary)
    assert probe == {
        "host": cluster[primary].ssh("hostname").stdout.strip(),
        "user": APP_USER,
        "cwd": f"/srv/prayer-room/releases/{live}/project",
        "release": live,
        "DJANGO_SETTINGS_MODULE": program_env["DJANGO_SETTINGS_MODULE"],
        "PRAYER_ROOM_ENV_FILE": program_env["PRAYER_ROOM_ENV_FILE"],
        "database": f"{cluster[db].address} verify-full",
        "server": f"{cluster[db].address} tls=True",
        "periodic tasks": sql(cluster, "SELECT count(*) FROM django_celery_beat_periodictask").strip(),
        "secret key sha256": hashlib.sha256(values["SECRET_KEY"].encode()).hexdigest(),
    }, out + shell.stderr
    assert probe["host"] == primary and int(probe["periodic tasks"]) > 0, probe

    failing = timed_fab(cluster, "fab manage, a failing command", "manage", "migrate nosuchapp")
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "No installed app with label 'nosuchapp'" in failing.stderr, failing.stderr
    exits = timed_fab(cluster, "fab manage, exit 3", "manage", "shell -c 'import sys; sys.exit(3)'")
    assert exits.returncode == 3, exits.stdout + exits.stderr  # manage.py's own code, not fab's 1

    secrets = [values["SECRET_KEY"]]
    secrets += [unquote(urlsplit(values[key]).password or "") for key in ("DATABASE_URL", "CELERY_BROKER_URL")]
    assert all(len(secret) >= 16 for secret in secrets), "the env file's secrets were not found"
    printed = "".join(r.stdout + r.stderr for r in (shell, failing, exits))
    assert not [secret for secret in secrets if secret in printed]


def test_24_rollback_moves_every_host_back(cluster):
    live = live_release(cluster, "web1")
    with request_loop(cluster) as loop:
        started = time.monotonic()
        out = ok(cluster.fab("rollback"))
        cluster.timings["rollback of the cluster"] = time.monotonic() - started
    previous = live_release(cluster, "web1")
    assert previous != live and f"{previous} is live on 3 hosts" in out
    assert {live_release(cluster, n) for n in APP_HOSTS} == {previous}
    cluster.timings["rollback: failed requests"] = len(loop.failures)
    cluster.timings["rollback: slowest request"] = loop.slowest
    assert loop.failures == [], loop.failures[:10]


SUPERVISORD_LOG = "/srv/prayer-room/log/supervisord.log"


def web_events(cluster: Cluster, name: str, skip: int) -> list[tuple[str, str]]:
    """(timestamp, "stopped"/"spawned") of the web programs in `name`'s supervisord log after its first `skip`
    lines. The containers share this machine's clock, so the hosts' timestamps compare."""
    lines = cluster[name].ssh(f"tail -n +{skip + 1} {SUPERVISORD_LOG}").stdout.splitlines()
    found = [re.match(r"(\S+ \S+) INFO (stopped|spawned): '?(?:prayer-room:)?web-\d", line) for line in lines]
    return [(match[1], match[2]) for match in found if match]


def test_24a_restart_of_the_web_role_goes_one_host_at_a_time(cluster):
    """Each web host's web programs are all back up before the next host's first one stops."""
    skip = {n: int(cluster[n].ssh(f"wc -l < {SUPERVISORD_LOG}").stdout) for n in ("web1", "web2")}
    with request_loop(cluster) as loop:
        out = ok(cluster.fab("restart", "--role", "web"))
        loop.wait_for_more(3)
    assert f"restarted on {cluster.web1.address}, {cluster.web2.address}" in out, out
    spans = {}
    for name in ("web1", "web2"):
        events = web_events(cluster, name, skip[name])
        assert [kind for _, kind in events].count("spawned") == 2, (name, events)
        spans[name] = (events[0][0], events[-1][0])  # its first web program stopped .. its last one started
    first, second = sorted(spans.values())
    assert first[1] < second[0], spans  # no overlap: one host at a time
    assert loop.failures == [], loop.failures[:10]


def test_24b_a_restore_shows_the_maintenance_page_on_every_web_host(cluster):
    name = ok(cluster.fab("backup")).split(":")[0].strip()
    count = "SELECT count(*) FROM prayer_room_api_prayerrequest"
    before = sql(cluster, count).strip()
    sql(cluster, "INSERT INTO prayer_room_api_prayerrequest (content, name, type, location_id, created_at, updated_at,"
        " prayer_count, response) SELECT 'after the backup', 'e2e', 'prayer', id, now(), now(), 0, ''"
        " FROM prayer_room_api_location LIMIT 1")  # fmt: skip
    assert sql(cluster, count).strip() != before
    web_hosts = [cluster[n].address for n in ("web1", "web2")]
    output = cluster.workdir / "restore.out"
    with output.open("w") as out:
        restore = subprocess.Popen(
            cluster.fab_argv("restore", name, "--yes"), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env=cluster.fab_env(),
        )  # fmt: skip
        seen_together, seen = 0, dict.fromkeys(web_hosts, 0)
        while restore.poll() is None:  # every web host, over and over, until the restore ends
            answers = {address: maintenance_page(address, cluster.lb.address) for address in web_hosts}
            for address, shown in answers.items():
                seen[address] += shown
            seen_together += all(answers.values())
            time.sleep(0.05)
    assert restore.returncode == 0, output.read_text()[-4000:]
    assert seen_together > 0 and all(seen.values()), (seen_together, seen)  # the page on both at once
    assert sql(cluster, count).strip() == before  # the backup is back
    for address in web_hosts:
        assert http_get(f"http://{address}/health/", headers={"Host": cluster.lb.address})[0] == 200
    status, body = http_get(f"{front(cluster)}/health/")
    assert status == 200, body


def test_24c_an_env_change_goes_to_every_app_host_by_role_and_loses_no_request(cluster):
    """fab env on a cluster: one table per app host (the service URLs from the db host); --set on every app host's
    env file, restarted web1, web2, then app under a GET+POST loop through the balancer; a key the db host gives is
    refused and changes no host's file."""
    listing = ok(cluster.fab("env"))
    for name in APP_HOSTS:
        assert f"== {cluster[name].address} (" in listing, listing
    assert re.search(r"^DATABASE_URL +postgres://prayer_room:\*{8}@.* env file \(written by provision from deploy"
                     r".toml roles.db\)$", listing, re.M), listing  # fmt: skip
    assert env_values(cluster, "web1")["SECRET_KEY"] not in listing
    before = {name: cluster[name].ssh(f"cat {ENV_FILE}").stdout for name in APP_HOSTS}
    refused = cluster.fab("env", "--set", "DATABASE_URL=postgres://x:y@elsewhere/z")
    assert refused.returncode == 1 and "roles, db = [...]" in refused.stderr, refused.stderr
    assert {name: cluster[name].ssh(f"cat {ENV_FILE}").stdout for name in APP_HOSTS} == before

    with request_loop(cluster) as loop:
        loop.wait_for_more(3)
        started, before_counts = time.monotonic(), (loop.ok, loop.posted)
        out = ok(cluster.fab("env", "--set", "PRAYER_ROOM_E2E_FLAG=on"))
        cluster.timings["env change (3 app hosts, in rollout order)"] = time.monotonic() - started
        gets, posts = loop.ok - before_counts[0], loop.posted - before_counts[1]
        loop.wait_for_more(3)
    cluster.timings["env change: failed requests"] = len(loop.failures)
    cluster.timings["env change: GETs answered during it"] = gets
    cluster.timings["env change: POSTs answered during it"] = posts
    assert loop.failures == [], loop.failures[:10]
    order = [out.index(f"-> restart {cluster[name].address} (") for name in APP_HOSTS]
    assert order == sorted(order), out[-3000:]
    for name in APP_HOSTS:
        assert env_values(cluster, name)["PRAYER_ROOM_E2E_FLAG"] == "on", name
        assert cluster[name].ssh(f"cat {ENV_FILE}.previous").stdout == before[name], name
        effective = cluster[name].ssh("cat /srv/prayer-room/shared/env.effective").stdout
        assert "PRAYER_ROOM_E2E_FLAG='on'" in effective, name


def maintenance_page(address: str, host: str) -> bool:
    """Whether the web host at `address` answers GET /health/ (for the site's name `host`) with the maintenance page."""
    try:
        with socket.create_connection((address, 80), timeout=5) as sock:
            sock.sendall(f"GET /health/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError:
        return False
    text = answer.decode(errors="replace")
    return text.startswith("HTTP/1.1 503") and "Retry-After: 30" in text and "Back in a moment" in text


def test_24d_maintenance_on_every_web_host_until_off_and_one_history_on_the_primary(cluster):
    web_hosts = [cluster[n].address for n in ("web1", "web2")]
    started = time.monotonic()
    out = ok(cluster.fab("maintenance", "on", "--message", "Back after the <upgrade>"))
    cluster.timings["fab maintenance on (2 web hosts)"] = time.monotonic() - started
    assert "maintenance is on" in out and all(maintenance_page(a, cluster.lb.address) for a in web_hosts)
    status, body = http_get(f"{front(cluster)}/health/")  # through the balancer
    assert status == 503 and "<p>Back after the &lt;upgrade&gt;</p>" in body, (status, body)
    shown = re.findall(r"^maintenance.*$", ok(cluster.fab("status")), re.M)
    assert len(shown) == 1 and re.fullmatch(r"maintenance: on since \S+ \(by \S+\): Back after the <upgrade>", shown[0])
    started = time.monotonic()
    ok(cluster.fab("maintenance", "off"))
    cluster.timings["fab maintenance off (2 web hosts)"] = time.monotonic() - started
    assert [http_get(f"http://{a}/health/", headers={"Host": cluster.lb.address})[0] for a in web_hosts] == [200, 200]

    history = ok(cluster.fab("history", "--lines", "200"))
    print(history)
    events = [re.split(r" {2,}", line)[1] for line in history.splitlines()[1:] if re.match(r"\d{4}-", line)]
    assert {"provision", "deploy", "maintenance on", "maintenance off"} <= set(events), history
    assert events[-2:] == ["maintenance on", "maintenance off"], history
    log = "/srv/prayer-room/log/history.jsonl"
    assert cluster.web1.ssh(f"stat -c '%U:%G %a' {log}").stdout.strip() == "root:root 600"
    assert cluster.web2.ssh(f"test -e {log}", check=False).returncode != 0  # one history: the primary's


BALANCER_SITE = "/etc/nginx/sites-available/prayer-room"


def drained_upstreams(cluster: Cluster) -> list[str]:
    """The web hosts the balancer's upstream marks `down` (drained by `fab os-update`), by container name."""
    site = cluster.lb.ssh(f"cat {BALANCER_SITE}").stdout
    down = re.findall(r"^\s*server (\S+):\d+ .* down;$", site, re.M)
    return [name for name in ("web1", "web2") if cluster[name].address in down]


def boot_ids(cluster: Cluster) -> dict[str, str]:
    return {name: cluster[name].ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip() for name in cluster.roles}


class FabWatch:
    """`fab ARGS` run in the background, each line of its output kept with the time.monotonic() it arrived at."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            cluster.fab_argv(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=cluster.fab_env(),
        )  # fmt: skip
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
        self.returncode = self.process.wait()

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def phase_of(self, moment: float, marker: str = "-> update ") -> str:
        """The host whose update had begun (its `-> update ADDRESS` line) at `moment`; "" before the first."""
        begun = [line.split(marker, 1)[1].split()[0] for at, line in self.lines if at <= moment and marker in line]
        return begun[-1] if begun else ""


def step_seconds(output: str, step: str) -> float | None:
    """The seconds of the step whose name starts with `step` (its `   ok|changed|FAILED  NAME (N s)` line)."""
    found = re.search(rf"^(?:\[[^\]]*\] )?   (?:ok|changed|FAILED)  {re.escape(step)}[^(]*\(([\d.]+) s\)", output, re.M)
    return float(found.group(1)) if found else None


def test_24e_os_update_drains_each_web_host_at_the_balancer_and_loses_no_request(cluster):
    """`fab os-update --reboot` on the cluster under a GET+POST loop through the balancer: each web host drained
    at the balancer (its upstream `down`, nginx reloaded, the old workers' requests finished), upgraded, rebooted,
    verified, put back; then the balancer, then the db host behind the maintenance page. No request fails while a
    web host is updated. First a web host that does not come back: the error names it, the balancer keeps it
    drained, no other host is touched (and no request fails). Before test_25, which leaves a web host dead."""
    web_hosts = {cluster[n].address: n for n in ("web1", "web2")}
    assert drained_upstreams(cluster) == []
    before = boot_ids(cluster)
    # A web host that does not come back.
    with request_loop(cluster) as loop, cluster.web1.rebooting_on_request(come_back=False) as exits:
        loop.wait_for_more(3)
        started = time.monotonic()
        stopped = FabWatch(cluster, "os-update", "--reboot", "--boot-timeout", "5")
        cluster.timings["os-update, a web host that does not come back: the command"] = time.monotonic() - started
        loop.wait_for_more(3)
    assert exits == [133], exits
    error = stopped.output.strip().splitlines()[-1]
    assert stopped.returncode == 1 and error.startswith(f"error: os-update stopped at {cluster.web1.address}: "), error
    assert f"the balancer {cluster.lb.address} keeps it drained" in error, error
    assert f"left untouched: {cluster.web2.address}, {cluster.lb.address}, {cluster.app.address}" in error, error
    assert loop.failures == [], loop.failures[:10]
    assert drained_upstreams(cluster) == ["web1"]
    cluster.web1.boot()  # the operator brings it back from the console
    assert {n: i for n, i in boot_ids(cluster).items() if n != "web1"} == {n: before[n] for n in before if n != "web1"}
    assert drained_upstreams(cluster) == ["web1"]  # it stays out until an os-update verifies it
    ok(cluster.fab("unlock"))  # its deploy lock could not be released while it was down
    started = time.monotonic()
    shown = ok(cluster.fab("status"))  # the operator sees it drained, and what puts it back
    cluster.timings["status, a web host drained at the balancer"] = time.monotonic() - started
    assert f"balancer {cluster.lb.address}: sends requests to {cluster.web2.address}\n" in shown, shown
    assert (
        f"ALERT balancer {cluster.lb.address}: drained (marked down, no request goes to it): {cluster.web1.address}; "
        "put back by `fab os-update` once it answers" in shown
    ), shown

    # The whole cluster, every host rebooted.
    with ExitStack() as stack, request_loop(cluster) as loop:
        reboots = {name: stack.enter_context(cluster[name].rebooting_on_request()) for name in cluster.roles}
        loop.wait_for_more(3)
        started = time.monotonic()
        run = FabWatch(cluster, "os-update", "--reboot")
        elapsed = time.monotonic() - started
        loop.wait_for_more(3)
    print(run.output)
    assert run.returncode == 0, run.output[-6000:]
    assert reboots == dict.fromkeys(cluster.roles, [133]), reboots
    after = boot_ids(cluster)
    assert all(after[name] != before[name] for name in cluster.roles), (before, after)
    order = [run.output.index(f"-> update {cluster[n].address} (") for n in ("web1", "web2", "lb", "app")]
    assert order == sorted(order), run.output[-4000:]
    assert drained_upstreams(cluster) == []  # each web host back in the upstream

    phases = [run.phase_of(moment) for moment in loop.failed_at]
    failed = {name: phases.count(cluster[name].address) for name in ("web1", "web2", "lb", "app")}
    sent = loop.ok + loop.posted + len(loop.failures)
    timings = cluster.timings
    timings["os-update --reboot of the cluster (4 hosts): the command"] = elapsed
    timings["os-update of the cluster: requests sent (GET+POST through the balancer)"] = sent
    for name, count in failed.items():
        timings[f"os-update of the cluster: failed requests while {name} was updated"] = count
    for name in ("web1", "web2", "lb", "app"):
        address = cluster[name].address
        timings[f"os-update of the cluster: {name} reboot until SSH"] = step_seconds(run.output, f"reboot {address} ")
        if name in web_hosts.values():
            timings[f"os-update of the cluster: {name} drain"] = step_seconds(run.output, f"drain {address} ")
    timings["os-update of the cluster: slowest request"] = loop.slowest
    # Nothing failed while the web hosts were updated; the balancer's own reboot and the db host's maintenance page
    # are the outages the cluster has (one balancer; one database).
    assert failed["web1"] == failed["web2"] == 0, [f for f, p in zip(loop.failures, phases, strict=True)
                                                   if p in web_hosts][:10]  # fmt: skip
    assert not [p for p in phases if p not in (cluster.lb.address, cluster.app.address)], phases
    assert loop.ok > 20 and loop.posted > 20
    status, body = http_get(f"{front(cluster)}/health/")
    assert status == 200, body
    history = ok(cluster.fab("history", "--lines", "5"))
    events = [re.split(r" {2,}", line)[1:3] for line in history.splitlines()[1:] if re.match(r"\d{4}-", line)]
    # The failed run's record could not be written: the history is kept on the primary, web1, which was down.
    assert events[-1] == ["os-update", "ok"] and "WARNING: os-update was not recorded in the history" in stopped.output
    assert events.count(["os-update", "failed"]) == 0, history


def test_24f_the_db_host_archives_and_a_restore_from_the_archive_brings_every_host_back(cluster, s3_server):
    """backup_repository on the cluster: `fab provision -H` of the db host (not the primary) sets up its archive to
    the tests' S3 API; `fab backups`, `fab status` and `fab backup --verify` from the site read it there (the restore
    test's migrations checked with the primary's release); `fab restore --latest --yes` restores the db host from
    the archive (the site's restore steps, whose maintenance page test_24b checks) and every app host runs and
    serves again: the last write is back. (The archive e2e covers the rest on one server.)"""
    cluster.app.ssh(f"printf %s {shlex.quote(s3_server.hosts_lines(cluster.app.gateway))} >> /etc/hosts")
    (cluster.workdir / "s3-ca.pem").write_text(s3_server.ca.read_text())
    # The bucket's key where provision finds it; no passphrase anywhere: provision makes one and saves it here.
    secrets_file = cluster.workdir / "deploy.secrets"
    secrets_file.write_text(f"BACKUP_S3_KEY={s3_server.key}\nBACKUP_S3_KEY_SECRET={s3_server.key_secret}\n")
    secrets_file.chmod(0o600)
    settings = cluster.settings
    cluster.configure(
        settings + f'backup_repository = "s3://{s3_server.bucket}/cluster-e2e"\n'
        f'backup_s3_endpoint = "{s3_server.endpoint}:{s3_server.port}"\n'
        'backup_s3_uri_style = "path"\nbackup_s3_ca_bundle = "s3-ca.pem"\n'
    )
    try:
        started = time.monotonic()
        out = ok(cluster.fab("-H", cluster.host("app"), "provision"))
        cluster.timings["provision -H the db host: its archive set up, a first full backup"] = (
            time.monotonic() - started
        )
        assert "a new archive passphrase (BACKUP_CIPHER_PASS) was generated" in out
        assert re.search(r"archive \(.*\): archiving to s3://", out), out
        assert sql(cluster, "SHOW archive_mode").strip() == "on"
        for name in ("web1", "web2", "lb"):  # pgBackRest and its secrets on the db host alone
            assert cluster[name].ssh("test -e /etc/pgbackrest/pgbackrest.conf", check=False).returncode != 0, name

        listed = ok(cluster.fab("backups"))
        archive = [line.strip() for line in listed.split("archive s3://", 1)[1].splitlines()[1:]]
        assert archive and archive[0].startswith("full "), listed
        verified = ok(cluster.fab("backup", "--verify"))
        assert "no unapplied migration" in verified and "row counts match" in verified, verified
        status = ok(cluster.fab("status"))
        assert re.search(r"archive: last restore test passed 0\.0 h ago", status), status
        assert "ALERT archive" not in status, status

        marker = f"written just before the restore {time.time()}"
        written = f"SELECT count(*) FROM prayer_room_api_prayerrequest WHERE content = '{marker}'"
        sql(cluster, "INSERT INTO prayer_room_api_location (name, slug, is_active, created_at)"
            " VALUES ('Cluster e2e', 'cluster-e2e', true, now()) ON CONFLICT DO NOTHING")  # fmt: skip
        sql(cluster, "INSERT INTO prayer_room_api_prayerrequest (content, name, type, location_id, created_at, "
            f"updated_at, prayer_count, response) SELECT '{marker}', 'e2e', 'prayer', id, now(), now(), 0, ''"
            " FROM prayer_room_api_location WHERE slug = 'cluster-e2e'")  # fmt: skip
        assert sql(cluster, written).strip() == "1"
        started = time.monotonic()
        restored = ok(cluster.fab("restore", "--latest", "--yes"))
        cluster.timings["restore --latest from the db host's archive"] = time.monotonic() - started
        assert "the data directory it replaced is kept at" in restored, restored
        assert sql(cluster, written).strip() == "1", restored
        assert sql(cluster, "SELECT pg_is_in_recovery()").strip() == "f"
        for name in APP_HOSTS:
            states = cluster[name].ssh("supervisorctl status", check=False).stdout.splitlines()
            assert states and all(" RUNNING " in line for line in states), (name, states)
        answer, body = http_get(f"{front(cluster)}/health/")
        assert answer == 200, body
    finally:
        cluster.configure(settings)


def test_25_killing_the_beat_leaders_host_lets_the_standby_lead(cluster):
    leader = sql(cluster, LEADER).strip()
    names = {cluster[n].address: n for n in ("web1", "web2")}
    assert leader in names, leader
    standby = next(address for address in names if address != leader)
    started = time.monotonic()
    cluster[names[leader]].pull_the_plug()
    now = leader
    while time.monotonic() - started < 90:
        now = sql(cluster, LEADER).strip()
        if now == standby:
            break
        time.sleep(0.5)
    cluster.timings["beat failover after the leader's host died"] = time.monotonic() - started
    assert now == standby, f"the leader is {now!r}, not the standby {standby}"
    # The balancer sends the site's requests to the web host that is left: a request it first sends to the dead
    # one waits out the connect timeout (2 s), then goes on.
    answers, slowest = [], 0.0
    for _ in range(6):
        begun = time.monotonic()
        answers.append(http_get(f"{front(cluster)}/health/", timeout=15)[0])
        slowest = max(slowest, time.monotonic() - begun)
    cluster.timings["balancer, slowest of 6 requests after a web host died"] = slowest
    assert answers == [200] * 6 and slowest < 5, (answers, slowest)
