"""The Django admin over plain HTTP, as a browser signs in: the login form's CSRF token and cookie, then the session."""

from __future__ import annotations

import http.cookiejar
import re
import urllib.parse
import urllib.request


def signed_in(base: str, username: str, password: str) -> urllib.request.OpenerDirector:
    """An opener that has posted the admin's login form at `base` (its CSRF token and cookie) and keeps the cookies
    it got back (the session, when the password was right)."""
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login = f"{base}/admin/login/?next=/admin/"
    with browser.open(login, timeout=10) as response:
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.read().decode())[1]
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": token, "username": username, "password": password})
    with browser.open(urllib.request.Request(login, data=form.encode(), headers={"Referer": login}), timeout=10):
        pass
    return browser


def admin_page(browser: urllib.request.OpenerDirector, url: str) -> tuple[int, str]:
    with browser.open(url, timeout=10) as response:
        return response.status, response.read().decode()


def sign_in_to_admin(base: str, username: str, password: str) -> tuple[int, str]:
    """Sign in through the admin's login form, then open /admin/: (status, page)."""
    return admin_page(signed_in(base, username, password), f"{base}/admin/")
