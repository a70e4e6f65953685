"""The operator's maintenance switch without a server: the message it takes, the page it renders, the state it reads,
and the nginx site that serves it."""

import json

import pytest

from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.maintenance import MaintenanceState, checked_message, parse_state
from deploy.render.nginx import MAINTENANCE_URI, render_maintenance_page, render_nginx_site

CONFIG = DeployConfig()


def test_the_operators_message_is_escaped_on_the_page():
    page = render_maintenance_page('Back at 10:00 <script>alert("x")</script> & $HOME')
    assert "<p>Back at 10:00 &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; $HOME</p>" in page
    assert "<script>" not in page and "being updated" not in page


def test_without_a_message_the_page_says_the_kits_words():
    assert "<p>The prayer room is being updated. Please try again in a minute.</p>" in render_maintenance_page()


@pytest.mark.parametrize(
    "message, problem",
    [("two\nlines", "one line of plain text"), ("bell\x07", "one line of plain text"), ("x" * 501, "under 500")],
)
def test_a_message_that_is_not_one_short_line_is_refused(message, problem):
    with pytest.raises(DeployError, match=problem):
        checked_message(message)


def test_a_message_is_stripped():
    assert checked_message("  back soon ") == "back soon"


def test_the_site_answers_503_while_either_flag_exists_and_serves_the_operators_page_when_it_exists():
    site = render_nginx_site(CONFIG, "203.0.113.7")
    layout = CONFIG.layout
    assert f"if (-f {layout.maintenance_flag}) {{\n        set $prayer_room_maintenance on;" in site
    assert f"if (-f {layout.maintenance_page}) {{\n        set $prayer_room_maintenance on;" in site
    assert f'if ($uri = {MAINTENANCE_URI}) {{\n        set $prayer_room_maintenance "";' in site
    assert f"error_page 503 {MAINTENANCE_URI};" in site
    assert f"root {layout.maintenance_page.parent};" in site
    assert f"try_files /{layout.maintenance_page.name} @maintenance;" in site


def test_status_reads_the_operators_record_and_the_kits_window():
    record = {"since": "2026-12-05T09:30:00Z", "by": "ann@laptop", "message": "back at 10"}
    both = parse_state(f"operator\n{json.dumps(record)}\n\nwindow\n")
    assert both == MaintenanceState(operator=record, window=True)
    assert both.line() == "on since 2026-12-05T09:30:00Z (by ann@laptop): back at 10; a deploy's window is open too"
    assert parse_state("window\n").line() == "on (a deploy's or restore's own window)"
    assert parse_state("").line() == "off" and not parse_state("").on
    assert parse_state("operator\n\n").line() == "on since ? (by ?): no message"  # a page without its record
