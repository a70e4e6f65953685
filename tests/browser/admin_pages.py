"""The admin steps staff take, shared by the browser tests."""

from __future__ import annotations

import re
from dataclasses import dataclass

PERIODIC_TASKS = "/admin/django_celery_beat/periodictask/"


@dataclass(frozen=True)
class Account:
    username: str
    password: str


def submit(page, button) -> None:
    """Click a submit button (selector or locator) and wait for the page it leads to."""
    with page.expect_navigation():
        (page.locator(button) if isinstance(button, str) else button).click()


def sign_in(page, account: Account) -> None:
    """Submit the admin login form as `account`."""
    page.goto("/admin/login/?next=/admin/")
    page.fill("#id_username", account.username)
    page.fill("#id_password", account.password)
    submit(page, "input[type=submit]")


def changelist_row(page, name: str):
    """The row of the changelist on screen whose name column is exactly `name`."""
    name_cell = page.locator("th.field-name", has_text=re.compile(rf"^\s*{re.escape(name)}\s*$"))
    return page.locator("#result_list tbody tr").filter(has=name_cell)


def run_list_action(page, action: str, *names: str) -> str:
    """Tick `names` in the periodic task list, run `action` with Go; return the message shown."""
    page.goto(PERIODIC_TASKS)
    for name in names:
        changelist_row(page, name).locator("input.action-select").check()
    page.select_option("select[name=action]", action)
    submit(page, page.get_by_role("button", name="Go"))
    return page.locator("ul.messagelist").inner_text()


def save_enabled_on_change_form(page, name: str, enabled: bool) -> str:
    """Open `name`'s change form from the list, set Enabled, Save; return the message shown."""
    page.goto(PERIODIC_TASKS)
    changelist_row(page, name).locator("th.field-name a").click()
    page.wait_for_selector("#id_enabled")
    page.set_checked("#id_enabled", enabled)
    submit(page, "input[name=_save]")
    return page.locator("ul.messagelist").inner_text()
