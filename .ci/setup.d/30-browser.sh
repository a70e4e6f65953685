# Browser tests (tests/browser): Debian's chromium, driven by Playwright for Python from the dev extra.
# NOTE: `playwright install` downloads a browser build of its own, which CI cannot fetch; the tests
# launch /usr/bin/chromium instead. Sourced by .ci/run after `apt-get update`.
if [ ! -x /usr/bin/chromium ]; then
    apt-get install -y -qq chromium >/dev/null
fi
/usr/bin/chromium --version 2>/dev/null
