"""`fab env`'s pure parts: KEY=VALUE read from the command line, where each variable comes from, secrets masked,
keys the kit derives refused, the env file edited in place, and the command that puts it on the server."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deploy.commands.env import replace_env_file
from deploy.config import DeployConfig, single_host_site
from deploy.env_sources import (
    MASK,
    format_table,
    masked,
    num_proxies_warning,
    parse_assignment,
    parse_changes,
    parse_key,
    refusal,
    variables,
)
from deploy.errors import DeployError
from deploy.on_server.common import read_env_file
from deploy.render.env_file import edit_env_file

SECRET = "s3cr3t-Value-that-must-never-show"
ENV_FILE = f"""# written by provision
SECRET_KEY={SECRET}
ALLOWED_HOSTS=203.0.113.7,127.0.0.1,localhost
DATABASE_URL=postgres://prayer_room:{SECRET}@127.0.0.1:5432/prayer_room
SECURE_SSL_REDIRECT=false
EMAIL_URL=smtp+tls://mailer:{SECRET}@smtp.example.org:587
LOG_LEVEL=info
"""


def one_host(**settings) -> DeployConfig:
    return single_host_site(DeployConfig(name="production", **settings), "root@203.0.113.7")


def cluster() -> DeployConfig:
    hosts = ("root@10.0.0.1", "root@10.0.0.2", "root@10.0.0.3")
    roles = (("web", hosts[:2]), ("worker", hosts[:2]), ("beat", hosts[1:2]), ("db", hosts[2:]))
    return DeployConfig(name="cluster", hosts=hosts, roles=roles)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("LOG_LEVEL=debug", ("LOG_LEVEL", "debug")),
        ("EMPTY=", ("EMPTY", "")),
        ("URL=https://x.example/?a=b=c", ("URL", "https://x.example/?a=b=c")),  # the first = splits
        ("_PRIVATE_2=a b  c", ("_PRIVATE_2", "a b  c")),
    ],
)
def test_a_well_formed_pair_is_read(given, expected):
    assert parse_assignment(given) == expected


@pytest.mark.parametrize(
    "given", ["LOG_LEVEL", "=value", "1ST=x", "BAD-KEY=x", "SP ACE=x", "K\u00e9Y=x", "KEY=line\nbreak", 'QUOTED="x"']
)
def test_a_malformed_pair_is_refused_with_the_expected_form(given):
    with pytest.raises(DeployError, match="KEY=VALUE"):
        parse_assignment(given)


def test_a_refused_pair_never_shows_its_value():
    with pytest.raises(DeployError) as refused:
        parse_assignment(f"DB-PASSWORD={SECRET}")
    assert SECRET not in str(refused.value) and "'DB-PASSWORD'=..." in str(refused.value)


@pytest.mark.parametrize("given", ["", "A=B", "9LIVES", "with-dash"])
def test_a_malformed_key_to_unset_is_refused(given):
    with pytest.raises(DeployError, match="expected KEY"):
        parse_key(given)


def test_a_key_named_twice_is_refused():
    with pytest.raises(DeployError, match="LOG_LEVEL named more than once"):
        parse_changes(one_host(), ["LOG_LEVEL=a"], ["LOG_LEVEL"])


@pytest.mark.parametrize(
    ("config", "key", "setting"),
    [
        (one_host(domain="prayer.example.org"), "ALLOWED_HOSTS", "domain"),
        (one_host(domain="prayer.example.org"), "SECURE_COOKIES", "domain"),
        (one_host(), "WEB_WORKERS", "web_workers"),
        (one_host(), "CELERY_TASK_TIME_LIMIT", "task_time_limit"),
        (one_host(), "DJANGO_SETTINGS_MODULE", "settings_module"),
        (one_host(extra_env=(("LOG_LEVEL", "warning"),)), "LOG_LEVEL", "env = { LOG_LEVEL"),
        (cluster(), "DATABASE_URL", "roles, db = "),
        (cluster(), "CACHE_URL", "fab provision"),
        (one_host(), "STATIC_ROOT", "the kit's own"),
        (one_host(), "PRAYER_ROOM_ENV_FILE", "the kit's own"),
    ],
)
def test_a_value_the_kit_derives_is_refused_naming_what_to_change(config, key, setting):
    why = refusal(config, key)
    assert why and key in why and setting in why, why
    with pytest.raises(DeployError, match=key):
        parse_changes(config, [f"{key}=x"], [])
    with pytest.raises(DeployError, match=key):
        parse_changes(config, [], [key])


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (one_host(), "ALLOWED_HOSTS"),  # no domain: the env file's
        (one_host(), "SECURE_SSL_REDIRECT"),
        (one_host(), "DATABASE_URL"),  # a site of one host: its own
        (one_host(), "SECRET_KEY"),
        (cluster(), "SECRET_KEY"),
        (cluster(), "LOG_LEVEL"),
    ],
)
def test_the_env_files_own_keys_may_change(config, key):
    assert refusal(config, key) is None
    assert parse_changes(config, [f"{key}=x"], []) == ({key: "x"}, [])


def test_every_value_the_kit_derives_has_a_setting_to_name():
    """Positive control of the table: each key environment_overrides gives (TLS, a cluster's queue) is refused."""
    config = replace(cluster().for_host("root@10.0.0.1"), domain="prayer.example.org", extra_env=(("A", "1"),))
    for key, _ in [*config.environment_overrides(), *config.environment_defaults()]:
        assert refusal(config, key), key


def test_each_variable_says_where_it_comes_from():
    config = one_host(domain="prayer.example.org", extra_env=(("FEATURE", "on"),), web_workers=3)
    rows = {row.key: row for row in variables(config, read_env_file(ENV_FILE))}
    assert rows["LOG_LEVEL"].source == "env file"
    assert rows["SECRET_KEY"].source == "env file"
    assert rows["FEATURE"].source == "deploy.toml env"
    assert rows["WEB_WORKERS"].value == "3" and rows["WEB_WORKERS"].source == "derived from deploy.toml web_workers"
    # The env file's SECURE_SSL_REDIRECT=false does not count: the domain makes it true.
    assert rows["SECURE_SSL_REDIRECT"].value == "true"
    assert rows["SECURE_SSL_REDIRECT"].source == "derived from deploy.toml domain (over the env file's value)"
    assert rows["CSRF_TRUSTED_ORIGINS"].value == "https://prayer.example.org"
    assert rows["DJANGO_SETTINGS_MODULE"].source.startswith("default")
    assert rows["STATIC_ROOT"].source.startswith("kit:")
    assert rows["PRAYER_ROOM_ENV_FILE"].value == "/srv/prayer-room/shared/env.effective"


def test_on_a_cluster_the_service_urls_come_from_the_db_host():
    rows = {row.key: row for row in variables(cluster().for_host("root@10.0.0.1"), read_env_file(ENV_FILE))}
    assert "deploy.toml roles.db" in rows["DATABASE_URL"].source
    assert rows["WORKER_QUEUES"].value == "celery,host.10.0.0.1"


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("SECRET_KEY", SECRET, MASK),
        ("STRIPE_API_KEY", SECRET, MASK),
        ("SENTRY_DSN", f"https://{SECRET}@o1.ingest.sentry.io/2", MASK),
        ("DB_PASSWORD", SECRET, MASK),
        ("GITHUB_TOKEN", SECRET, MASK),
        ("DATABASE_URL", f"postgres://prayer_room:{SECRET}@db:5432/x", f"postgres://prayer_room:{MASK}@db:5432/x"),
        ("CELERY_BROKER_URL", f"redis://:{SECRET}@10.0.0.3:6379/0", f"redis://:{MASK}@10.0.0.3:6379/0"),
        ("WEBHOOK_URL", f"https://{SECRET}@hooks.example/x", f"https://{MASK}@hooks.example/x"),
        ("CALLBACK", f"https://x.example/cb?token={SECRET}&mode=a", f"https://x.example/cb?token={MASK}&mode=a"),
        ("LOG_LEVEL", "info", "info"),
        ("ALLOWED_HOSTS", "a.example,127.0.0.1", "a.example,127.0.0.1"),
        ("EMAIL_URL", "consolemail://", "consolemail://"),
        ("SECRET_KEY", "", ""),
    ],
)
def test_secret_values_are_masked_and_others_shown(key, value, shown):
    assert masked(key, value) == shown


def test_the_table_never_shows_a_secret():
    config = one_host(domain="prayer.example.org")
    table = format_table(variables(config, read_env_file(ENV_FILE)))
    assert SECRET not in table
    assert "SECRET_KEY" in table and MASK in table and "LOG_LEVEL" in table
    assert table.splitlines()[0].split() == ["KEY", "VALUE", "SOURCE"]


def test_setting_replaces_the_line_in_place_adds_new_keys_and_keeps_everything_else():
    text = "# a comment\nA=1\nexport B=2\nC=keep\nB=3\n\n# end\n"
    edited = edit_env_file(text, {"B": "new", "D": " padded "}, ["A"])
    assert edited == '# a comment\nB=new\nC=keep\n\n# end\nD=" padded "\n'
    assert read_env_file(edited) == {"B": "new", "C": "keep", "D": " padded "}


def test_a_file_without_a_final_newline_and_an_unchanged_value():
    assert edit_env_file("A=1", {"B": "2"}, []) == "A=1\nB=2\n"
    assert edit_env_file("A=1\n", {"A": "1"}, []) == "A=1\n"
    assert edit_env_file("A=1\n", {}, ["NOT_THERE"]) == "A=1\n"


def test_the_command_checks_the_file_keeps_the_previous_and_renames_atomically():
    layout = one_host().layout
    command = replace_env_file(layout, "prayer-room", "ab" * 32, effective=True)
    check, keep, previous, env, effective = command.split(" && ")
    assert "sha256sum" in check and "ab" * 32 in check and "exit 3" in check
    assert keep == (
        "install -o root -g prayer-room -m 0640 /srv/prayer-room/shared/env /srv/prayer-room/shared/env.previous.new"
    )
    assert previous == "mv -f /srv/prayer-room/shared/env.previous.new /srv/prayer-room/shared/env.previous"
    assert env == "mv -f /srv/prayer-room/shared/env.new /srv/prayer-room/shared/env"
    assert effective == "mv -f /srv/prayer-room/shared/env.effective.new /srv/prayer-room/shared/env.effective"
    without = replace_env_file(layout, "prayer-room", "ab" * 32, effective=False)
    assert "mv -f /srv/prayer-room/shared/env.effective" not in without


@pytest.mark.parametrize("value", ["2", "0", "3", " 2"])
def test_num_proxies_other_than_one_in_the_env_file_is_warned_of_with_the_fix(value):
    warning = num_proxies_warning(one_host(), read_env_file(ENV_FILE) | {"NUM_PROXIES": value})
    assert warning is not None and warning.startswith("WARNING: ") and "\n" not in warning
    assert f"NUM_PROXIES={value}" in warning
    assert "`fab env --unset NUM_PROXIES`" in warning and "docs/security.md" in warning


def test_num_proxies_set_in_deploy_toml_env_is_warned_of_with_its_own_fix():
    warning = num_proxies_warning(one_host(extra_env=(("NUM_PROXIES", "2"),)), read_env_file(ENV_FILE))
    assert warning is not None and "remove it from deploy.toml's env" in warning


@pytest.mark.parametrize("extra", [{}, {"NUM_PROXIES": "1"}])
def test_num_proxies_unset_or_one_is_not_warned_of(extra):
    assert num_proxies_warning(one_host(), read_env_file(ENV_FILE) | extra) is None


@pytest.mark.parametrize("value", ["2", "0", " 2", "3"])
def test_setting_num_proxies_to_anything_but_one_is_refused_naming_trusted_proxies(value):
    with pytest.raises(DeployError) as refused:
        parse_changes(one_host(), [f"NUM_PROXIES={value}"], [])
    message = str(refused.value)
    assert f"NUM_PROXIES={value} is refused" in message and "`trusted_proxies`" in message, message
    assert "\n" not in message


def test_num_proxies_may_be_set_to_one_or_unset():
    assert parse_changes(one_host(), ["NUM_PROXIES=1"], []) == ({"NUM_PROXIES": "1"}, [])
    assert parse_changes(one_host(), [], ["NUM_PROXIES"]) == ({}, ["NUM_PROXIES"])
