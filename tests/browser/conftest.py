"""The running stack and Debian's chromium for the admin browser tests; artifacts kept on failure."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.browser.admin_pages import Account, sign_in
from tests.support import stack

CHROMIUM = os.environ.get("BROWSER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS_DIR = stack.REPO / "test-artifacts" / "browser"
PROCESS_NAMES = ("web", "worker", "beat")


@dataclass
class AdminStack:
    """web, worker and beat running on the production settings, with the accounts the tests sign in with."""

    base_url: str
    database: stack.Database
    static_root: Path
    processes: dict[str, stack.Process]
    staff: Account
    member: Account

    @property
    def worker(self) -> stack.Process:
        return self.processes["worker"]

    @property
    def beat(self) -> stack.Process:
        return self.processes["beat"]

    def count(self, table: str) -> int:
        return self.database.query(f"SELECT count(*) FROM {table}")[0][0]


@pytest.fixture(scope="session")
def chromium():
    """One headless Debian chromium for the session, driven by Playwright (nothing downloaded)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium chromium-driver")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def admin_stack(tmp_path_factory):
    """Migrate a throwaway database, create the accounts, start web, worker and beat; stop them after."""
    reason = stack.services_unavailable()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("admin-stack")
    static_root = workdir / "static"
    redis_db = stack.claim_redis_db("browser")
    database = stack.Database().create()
    port = stack.free_port()
    env = stack.production_env(
        database,
        redis_db,
        PORT=str(port),
        STATIC_ROOT=str(static_root),
        WEB_WORKERS="2",
        WORKER_CONCURRENCY="2",
        BEAT_MAX_INTERVAL="5",
        CSRF_TRUSTED_ORIGINS=f"http://127.0.0.1:{port}",
    )
    staff = Account("staff", secrets.token_urlsafe(16))
    member = Account("member", secrets.token_urlsafe(16))
    processes: dict[str, stack.Process] = {}
    try:
        stack.manage(env, "migrate", "--noinput")
        stack.manage(env, "collectstatic", "--noinput")
        stack.manage(
            {**env, "DJANGO_SUPERUSER_PASSWORD": staff.password},
            "createsuperuser",
            "--noinput",
            "--username",
            staff.username,
            "--email",
            "staff@example.org",
        )
        stack.manage(
            env,
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model; "
            f"get_user_model().objects.create_user({member.username!r}, password={member.password!r})",
        )
        for name in PROCESS_NAMES:
            processes[name] = stack.Process(name, env, workdir)
        base_url = f"http://127.0.0.1:{port}"
        processes["web"].wait_for_http(f"{base_url}/health/")
        processes["worker"].wait_for_output("ready.")
        processes["beat"].wait_for_output("beat: Starting...")
        yield AdminStack(base_url, database, static_root, processes, staff, member)
    finally:
        for process in processes.values():
            process.stop()
        database.drop()
        stack.release_redis_db(redis_db)


_phase_reports = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so fixtures can tell in teardown whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    item.stash.setdefault(_phase_reports, {})[report.when] = report


def _artifact_dir(item) -> Path:
    return ARTIFACTS_DIR / re.sub(r"[^\w.-]+", "_", item.name)


@pytest.fixture
def page(request, chromium, admin_stack):
    """A fresh browser context on the stack; on failure its screenshot, HTML and process logs are kept."""
    artifacts = _artifact_dir(request.node)
    shutil.rmtree(artifacts, ignore_errors=True)
    context = chromium.new_context(base_url=admin_stack.base_url, viewport={"width": 1440, "height": 900})
    context.set_default_timeout(15_000)
    browser_page = context.new_page()
    yield browser_page
    reports = request.node.stash.get(_phase_reports, {})
    if any(report.failed for report in reports.values()):
        artifacts.mkdir(parents=True, exist_ok=True)
        try:
            browser_page.screenshot(path=str(artifacts / "screenshot.png"), full_page=True)
            (artifacts / "page.html").write_text(browser_page.content())
        except Exception as exc:  # noqa: BLE001 - a dead page must not hide the test's own failure
            (artifacts / "artifact-error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        for name, process in admin_stack.processes.items():
            shutil.copyfile(process.log_path, artifacts / f"{name}.log")
    context.close()


@pytest.fixture
def staff_page(page, admin_stack):
    """A page signed in to the admin as the staff superuser."""
    sign_in(page, admin_stack.staff)
    page.wait_for_selector("#site-name")
    assert page.url.endswith("/admin/"), page.url
    return page
