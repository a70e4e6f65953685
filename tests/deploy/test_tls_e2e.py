"""HTTPS by default for a domain: `fab provision` + `fab deploy` on a fresh Debian 13 and 12 (systemd-nspawn) get
a certificate from a real ACME server (Debian's pebble, validating HTTP-01 against the container's nginx).

One container per release, provisioned once; on each the tests run in file order: issuance and the first HTTPS
answer, what the site sends (redirect, HSTS, Secure cookies, a CSRF-checked POST, 444s), a second provision, a
forced renewal and a redeploy under a loop of GETs and POSTs over HTTPS.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from deploy.config import load_config
from deploy.tls import certbot_command
from tests.deploy.target import RequestLoop
from tests.support import acme
from tests.support.nspawn import RELEASES, Container, build_rootfs, missing_tools, operator_env
from tests.support.webhook import Receiver

REPO = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).with_name("fab")
ARTIFACTS = REPO / "test-artifacts"
DOMAIN = "vps.prayer-room.test"
ALIAS = f"www.{DOMAIN}"
CERT = "/etc/letsencrypt/live/prayer-room/fullchain.pem"
SUPERVISORCTL = "supervisorctl -c /etc/prayer-room/supervisord.conf"
CLEAN_CHECK = "System check identified no issues (0 silenced)."

_missing = missing_tools() or acme.missing_tools()
pytestmark = [pytest.mark.deploy, pytest.mark.timeout(1800), pytest.mark.skipif(bool(_missing), reason=str(_missing))]
figures: dict[str, object] = {}


class Site:
    """The provisioned container, the ACME server it trusts, its notify target (`receiver`), and HTTPS requests to
    DOMAIN at its address."""

    def __init__(self, vps: Container, pebble: acme.Pebble, config: Path, receiver: Receiver):
        self.vps, self.pebble, self.config, self.receiver = vps, pebble, config, receiver
        self.context: ssl.SSLContext | None = None

    def fab(self, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
        command = [str(FAB), "-H", f"root@{self.vps.address}", "-i", str(self.vps.key), args[0]]
        command += ["--env", "tls", "--config", str(self.config), *args[1:]]
        env = operator_env(self.vps.workdir / "operator", self.vps)
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)

    def trust_the_issuer(self) -> None:
        """Trust pebble's root (a new one each pebble run), as browsers trust Let's Encrypt's."""
        self.context = ssl.create_default_context(cadata=self.pebble.root_pem())

    def connection(self, scheme: str, name: str = DOMAIN, timeout: float = 10) -> http.client.HTTPConnection:
        address, context = self.vps.address, self.context

        class Pinned(http.client.HTTPSConnection):
            """HTTPS to `name` (SNI, certificate check) at the container's address: no DNS needed."""

            def connect(self):
                sock = socket.create_connection((address, self.port), self.timeout)
                self.sock = self._context.wrap_socket(sock, server_hostname=self.host)

        if scheme == "http":
            return http.client.HTTPConnection(address, 80, timeout=timeout)
        return Pinned(name, 443, timeout=timeout, context=context or ssl.create_default_context())

    def request(self, method: str, url: str, body=None, headers=None, name: str = DOMAIN):
        """(status, headers, body text) of one request; `url` is https://DOMAIN/... or http://DOMAIN/..."""
        parts = urllib.parse.urlsplit(url)
        conn = self.connection(parts.scheme, name)
        try:
            data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
            base = {"Host": name} | ({"Content-Type": "application/json"} if body is not None else {})
            conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), data, base | (headers or {}))
            response = conn.getresponse()
            return response.status, response.headers, response.read().decode(errors="replace")
        finally:
            conn.close()

    def loop_request(self, url: str, data: dict | None = None, **_) -> tuple[int | None, str]:
        try:
            status, _, body = self.request("GET" if data is None else "POST", url, data)
            return status, body
        except (OSError, http.client.HTTPException) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def served_certificate(self) -> dict:
        with socket.create_connection((self.vps.address, 443), timeout=10) as sock:
            with self.context.wrap_socket(sock, server_hostname=DOMAIN) as tls:
                return tls.getpeercert()

    def api_posts(self) -> tuple[tuple[str, dict], ...]:
        """POST a request and "I prayed" for an approved one (made here in the server's database)."""
        sql = " ".join(
            [
                "INSERT INTO prayer_room_api_location (name, slug, is_active, created_at)",
                "VALUES ('TLS', 'tls', true, now()) ON CONFLICT DO NOTHING;",
                "INSERT INTO prayer_room_api_prayerrequest (content, name, type, location_id, created_at, updated_at,",
                "prayer_count, approved_at, response) SELECT 'pray over HTTPS', 'e2e', 'prayer', id, now(), now(),",
                "0, now(), '' FROM prayer_room_api_location WHERE slug = 'tls' RETURNING id;",
            ]
        )
        out = self.vps.ssh(f"cd / && runuser -u postgres -- psql -X -q -tA prayer_room -c {shlex.quote(sql)}").stdout
        request_id = out.split()[-1]
        base = f"https://{DOMAIN}/api/requests/"
        submit = {"type": "prayer", "content": "a request sent over HTTPS", "location": "tls"}
        return ((base, submit), (f"{base}{request_id}/prayed/", {}))

    def request_loop(self) -> RequestLoop:
        return RequestLoop(f"https://{DOMAIN}/health/", posts=self.api_posts(), request=self.loop_request)


@pytest.fixture(scope="module", params=list(RELEASES))
def site(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"tls-{request.param}")
    (workdir / "vps").mkdir()
    vps = Container(workdir / "vps").create(build_rootfs(request.param))
    pebble, stack = None, ExitStack()
    try:
        vps.boot()
        pebble = acme.Pebble(workdir / "pebble", listen_address=vps.gateway, answer=vps.address).start()
        receiver = stack.enter_context(Receiver(host=vps.gateway))
        config = workdir / "deploy.toml"
        config.write_text(
            "[environments.tls]\n"
            f'domain = "{DOMAIN}"\n'
            'acme_email = "ops@prayer-room.test"\n'
            f'acme_directory = "{pebble.directory}"\n'
            f'acme_ca_bundle = "{pebble.ca}"\n'
            f'notify = ["{receiver.url}"]\n'
            # the request loops POST far more than a visitor may
            "write_rate_per_minute = 0\n"
            'env = { THROTTLE_SUBMIT = "1000000/hour", THROTTLE_PRAYED = "1000000/hour" }\n'
        )
        yield Site(vps, pebble, config, receiver)
    finally:
        stack.close()
        if pebble:
            pebble.stop()
        vps.destroy()
        if figures:
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / f"tls-e2e-figures-{request.param}.json").write_text(json.dumps(figures, indent=1) + "\n")
            figures.clear()


def ok(result: subprocess.CompletedProcess, site: Site | None = None) -> str:
    pebble_log = f"\npebble: {site.pebble.log()}" if site else ""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr}{pebble_log}"
    return result.stdout


def test_provision_gets_a_certificate_and_deploy_serves_https(site):
    started = time.monotonic()
    out = ok(site.fab("provision"), site)
    figures["provision (fresh server, with certificate) s"] = round(time.monotonic() - started, 1)
    assert "changed  certificate" in out and f"certificate for {DOMAIN} issued by {site.pebble.directory}" in out
    ok(site.fab("deploy", "--allow-dirty"), site)
    site.trust_the_issuer()
    while True:
        try:
            status, _, body = site.request("GET", f"https://{DOMAIN}/health/")
        except OSError as exc:
            status, body = None, str(exc)
        if status == 200:
            break
        assert time.monotonic() - started < 1500, (status, body)
        time.sleep(0.5)
    figures["fab provision to first HTTPS 200 (provision + deploy) s"] = round(time.monotonic() - started, 1)
    assert "release" in json.loads(body)
    certificate = site.served_certificate()
    assert ("DNS", DOMAIN) in certificate["subjectAltName"]


def test_http_redirects_to_https_except_the_acme_challenge(site):
    status, headers, _ = site.request("GET", f"http://{DOMAIN}/api/requests/?type=prayer")
    assert status == 301 and headers["Location"] == f"https://{DOMAIN}/api/requests/?type=prayer"
    status, headers, _ = site.request("GET", f"http://{DOMAIN}/.well-known/acme-challenge/absent")
    assert status == 404 and "Location" not in headers


def test_https_sends_hsts_on_app_and_static_responses_and_hides_the_version(site):
    status, headers, page = site.request("GET", f"https://{DOMAIN}/admin/login/")
    assert status == 200 and headers["Strict-Transport-Security"].startswith("max-age=31536000")
    assert headers["Server"] == "nginx"
    css = re.search(r'href="(/static/admin/css/base\.[0-9a-f]{12}\.css)"', page).group(1)
    status, headers, _ = site.request("GET", f"https://{DOMAIN}{css}")
    assert status == 200 and headers["Strict-Transport-Security"].startswith("max-age=31536000")
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_cookies_are_secure_and_a_csrf_protected_post_works_over_https(site):
    status, headers, page = site.request("GET", f"https://{DOMAIN}/admin/login/")
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("csrftoken=") and "; Secure" in cookie, cookie
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": token, "username": "nobody", "password": "wrong"})
    common = {"Content-Type": "application/x-www-form-urlencoded", "Origin": f"https://{DOMAIN}"}
    status, _, page = site.request(
        "POST", f"https://{DOMAIN}/admin/login/", form.encode(), common | {"Cookie": cookie.split(";")[0]}
    )
    assert status == 200 and "Please enter the correct username and password" in page  # past the CSRF check
    status, _, _ = site.request("POST", f"https://{DOMAIN}/admin/login/", form.encode(), common)
    assert status == 403  # the same POST without its cookie: refused


def test_unknown_names_get_no_answer_on_80_and_no_handshake_on_443(site):
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        site.request("GET", f"http://{DOMAIN}/health/", headers={"Host": "unknown.example.org"})
    with pytest.raises(ssl.SSLError):
        site.request("GET", "https://other.example.org/health/", name="other.example.org")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):  # the bare address is not the site
        site.request("GET", f"http://{DOMAIN}/health/", headers={"Host": site.vps.address})


def test_check_deploy_is_clean_with_the_programs_environment(site):
    """`manage.py check --deploy` with exactly the environment web-1 runs with."""
    pid = site.vps.ssh(f"{SUPERVISORCTL} pid prayer-room:web-1").stdout.strip()
    run = "; ".join(
        [
            "import os",
            f"raw = open('/proc/{pid}/environ').read().split(chr(0))",
            "env = dict(item.split('=', 1) for item in raw if item)",
            "os.chdir('/srv/prayer-room/current/project')",
            "python = '/srv/prayer-room/current/.venv/bin/python'",
            "os.execve(python, [python, 'manage.py', 'check', '--deploy'], env)",
        ]
    )
    result = site.vps.ssh(f"runuser -u prayer-room -- python3 -c {shlex.quote(run)} 2>&1", check=False)
    figures["check --deploy"] = result.stdout.strip()
    assert result.returncode == 0 and result.stdout.strip() == CLEAN_CHECK, result.stdout


def test_fab_manage_and_roots_command_run_check_deploy_clean_as_the_programs_do(site):
    """The operator's two ways in, `fab manage "check --deploy"` and root's prayer-room-manage over SSH, read the
    programs' environment: no security.W0xx (an env file sourced by hand once gave W008, W012, W016)."""
    through_fab = site.fab("manage", "check --deploy")
    as_root = site.vps.ssh("/usr/local/sbin/prayer-room-manage check --deploy 2>&1", check=False)
    figures["fab manage check --deploy"] = (through_fab.stdout + through_fab.stderr).strip()
    for result, out in ((through_fab, through_fab.stdout + through_fab.stderr), (as_root, as_root.stdout)):
        assert result.returncode == 0 and CLEAN_CHECK in out and "security.W0" not in out, out
    listing = ok(site.fab("env"))  # where the values check --deploy looks at come from
    figures["fab env"] = listing.splitlines()
    for key in ("SECURE_SSL_REDIRECT", "SECURE_COOKIES"):
        assert re.search(rf"^{key} +true +derived from deploy.toml domain", listing, re.M), listing
    assert re.search(
        rf"^CSRF_TRUSTED_ORIGINS +https://{re.escape(DOMAIN)} +derived from deploy.toml domain", listing, re.M
    )
    # Positive control: prayer-room-manage reading a copy of that environment without the redirect warns W008.
    copy = "/srv/prayer-room/shared/env.e2e-control"
    unredirected = site.vps.ssh(
        f"sed \"s/^SECURE_SSL_REDIRECT=.*/SECURE_SSL_REDIRECT='false'/\" /srv/prayer-room/shared/env.effective"
        f" > {copy} && chgrp prayer-room {copy} && chmod 0640 {copy}"
        f" && sed 's|^env_file=.*|env_file={copy}|' /usr/local/sbin/prayer-room-manage > /root/manage-control"
        f" && sh /root/manage-control check --deploy 2>&1; rm -f {copy} /root/manage-control",
        check=False,
    )
    assert "security.W008" in unredirected.stdout, unredirected.stdout


def test_a_second_provision_keeps_tls_and_changes_nothing(site):
    before = site.served_certificate()["serialNumber"]
    out = ok(site.fab("provision"), site)
    assert "nothing changed, the server was already provisioned" in out, out
    assert site.request("GET", f"https://{DOMAIN}/health/")[0] == 200
    assert site.served_certificate()["serialNumber"] == before


def test_an_added_alias_reissues_the_certificate_for_both_names_and_redirects_to_the_domain(site):
    before = site.served_certificate()["serialNumber"]
    text = site.config.read_text()
    site.config.write_text(text.replace(f'domain = "{DOMAIN}"\n', f'domain = "{DOMAIN}"\naliases = ["{ALIAS}"]\n'))
    started = time.monotonic()
    out = ok(site.fab("provision"), site)
    figures["provision re-issuing the certificate for an added alias s"] = round(time.monotonic() - started, 1)
    assert "changed  certificate" in out and f"certificate for {DOMAIN}, {ALIAS} issued by" in out, out
    certificate = site.served_certificate()
    assert certificate["serialNumber"] != before
    assert {("DNS", DOMAIN), ("DNS", ALIAS)} == set(certificate["subjectAltName"])
    # The alias: a TLS handshake checked against its own name, then 301 to the domain with the path and query.
    for scheme in ("https", "http"):
        status, headers, _ = site.request("GET", f"{scheme}://{ALIAS}/api/requests/?type=prayer&x=1", name=ALIAS)
        assert status == 301 and headers["Location"] == f"https://{DOMAIN}/api/requests/?type=prayer&x=1"
    assert site.request("GET", f"https://{DOMAIN}/health/")[0] == 200  # the domain itself still serves
    line = re.search(r"^certificate: (.+), expires in \d+ days.*$", ok(site.fab("status")), re.M)
    assert set(line.group(1).split(", ")) == {DOMAIN, ALIAS} and "WARNING" not in line.group(0), line.group(0)
    assert "nothing changed" in ok(site.fab("provision"), site)  # the certificate fits the names now


def test_renewal_is_scheduled_and_a_forced_one_drops_no_request(site):
    timer = site.vps.ssh("systemctl is-enabled certbot.timer; systemctl is-active certbot.timer").stdout.split()
    assert timer == ["enabled", "active"]
    environment = site.vps.ssh("systemctl show certbot.service --property=Environment").stdout
    assert "REQUESTS_CA_BUNDLE=/etc/prayer-room/acme-ca.pem" in environment  # what the timer's renewals trust
    before = site.served_certificate()["serialNumber"]
    with site.request_loop() as loop:
        loop.wait_for_more(3)  # the loop runs before the renewal starts
        renew = site.vps.ssh(
            "REQUESTS_CA_BUNDLE=/etc/prayer-room/acme-ca.pem certbot renew --force-renewal --no-random-sleep-on-renew",
            check=False,
        )
        assert renew.returncode == 0, renew.stdout + renew.stderr
        started = time.monotonic()
        while site.served_certificate()["serialNumber"] == before:  # the deploy hook's graceful reload
            assert time.monotonic() - started < 30, "nginx still serves the old certificate 30 s after the renewal"
            time.sleep(0.2)
        figures["forced renewal: seconds until the new certificate was served"] = round(time.monotonic() - started, 1)
        loop.wait_for_more(3)  # requests over the new certificate too
    figures["forced renewal: failed requests / requests (GET, POST)"] = (
        f"{len(loop.failures)} / {loop.ok + loop.posted + len(loop.failures)}"
    )
    assert loop.failures == [] and loop.ok > 5 and loop.posted > 10, loop.failures[:5]
    assert site.served_certificate()["serialNumber"] != before  # nginx reloaded with the new one
    status = ok(site.fab("status"))
    line = re.search(
        rf"^certificate: {re.escape(DOMAIN)}(, {re.escape(ALIAS)})?, expires in (\d+) days.*$", status, re.M
    )
    assert int(line.group(2)) > 14 and "WARNING" not in line.group(0)


def test_a_redeploy_fails_no_get_or_post_over_https(site):
    with site.request_loop() as loop:
        loop.wait_for_more(3)  # the loop runs before the deploy starts
        out = ok(site.fab("deploy", "--allow-dirty"), site)
        loop.wait_for_more(3)  # and after it
    assert "restart web-1" in out and "restart web-2" in out
    figures["redeploy: failed requests / requests (GET, POST)"] = (
        f"{len(loop.failures)} / {loop.ok + loop.posted + len(loop.failures)}"
    )
    assert loop.failures == [] and loop.ok > 10 and loop.posted > 20, loop.failures[:5]


# --- The watchdog's certificate alert (Debian 13 only: the same check on both releases) -------------------------

WATCHDOG = "prayer-room-watchdog.service"
SHORT_LIVED_DAYS = 10  # under the watchdog's 14 days, and due for certbot's renewal (30 days before expiry)


def watch_until(site: Site, event: str, since: float, timeout: float = 90) -> dict:
    """Runs of the watchdog (as its timer starts them) until the receiver got `event` about the certificate."""
    deadline = time.monotonic() + timeout
    while True:
        site.vps.ssh(f"systemctl start {WATCHDOG}")
        found = [body for body in site.receiver.about("certificate", since) if body["event"] == event]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {event} in {timeout} s: {[b['text'] for b in site.receiver.received]}"
        time.sleep(1)


@pytest.mark.parametrize("site", ["trixie"], indirect=True)
def test_a_certificate_near_expiry_is_one_alert_a_failed_renewal_keeps_it_and_the_renewal_resolves_it(site):
    """A certificate from an ACME server issuing 10-day ones: the watchdog alerts once; certbot.timer's renewal
    failing (that server gone) keeps the one alert and says so; a certificate from the site's own ACME server (as
    `fab provision` gets one) and the timer's next renewal run succeeding resolve it."""
    started = time.time()
    short = acme.Pebble(site.vps.workdir.parent / "pebble-short", site.vps.gateway, site.vps.address, port=14001,
                        validity_days=SHORT_LIVED_DAYS)  # fmt: skip
    short.start(listener=site.pebble.listener)  # the CA the server trusts for its ACME server
    config = load_config(site.config, "tls")
    try:
        from_short = certbot_command(replace(config, acme_directory=short.directory), replace=True)
        issued = site.vps.ssh(from_short, check=False)
        assert issued.returncode == 0, issued.stdout + issued.stderr + short.log()
        opened = watch_until(site, "alert", started)
        figures["watchdog: certificate near expiry, to its alert (s)"] = round(opened["_arrived"] - started, 1)
        days = re.search(rf"the certificate for {re.escape(DOMAIN)} expires in (\d+\.\d) days", opened["message"])
        assert days and float(days.group(1)) < 14 and opened["severity"] == "warning", opened
    finally:
        short.stop()
    # certbot.timer's renewal (Debian's certbot.service): due, and its ACME server is gone
    assert site.vps.ssh("systemctl start certbot.service", check=False).returncode != 0
    site.vps.ssh(f"systemctl start {WATCHDOG}")
    state = json.loads(site.vps.ssh("cat /var/lib/prayer-room-watchdog/state.json").stdout)
    assert "the last renewal failed" in state["open"]["certificate"]["message"], state["open"]

    renewed = time.time()
    ok(site.vps.ssh(certbot_command(config, replace=True), check=False), site)  # from the site's ACME server
    site.vps.ssh("systemctl start certbot.service")  # the timer's next run: nothing due, and it succeeds
    resolved = watch_until(site, "resolved", renewed)
    figures["watchdog: certificate renewed, to its resolved notice (s)"] = round(resolved["_arrived"] - renewed, 1)
    events = [body["event"] for body in site.receiver.about("certificate", started)]
    assert events == ["alert", "resolved"], events
