"""The pieces `fab plan` and the restarts are built from: the redacted config diff, program names, the env file."""

import pytest

from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.on_server.common import read_env_file
from deploy.processes import Programs, config_diff, redact
from deploy.render.programs_env import effective_environment, render_effective_env
from deploy.render.supervisord import render_supervisord_conf, server_context
from deploy.verify import health_host

ENV = {"SECRET_KEY": "s3cr%t-value", "DATABASE_URL": "postgres://u:pw@127.0.0.1/db", "ALLOWED_HOSTS": "example.org"}


def rendered(config: DeployConfig, env=ENV) -> str:
    return render_supervisord_conf(server_context(config, env, home="/home/app"))


def test_an_unchanged_config_has_no_diff():
    text = rendered(DeployConfig())
    assert config_diff(text, text) == ""


def test_the_diff_names_changed_settings_and_never_shows_a_value():
    live = rendered(DeployConfig())
    new = rendered(DeployConfig(web_graceful_timeout=25), {**ENV, "SECRET_KEY": "other-secret"})
    diff = config_diff(live, new)
    assert "-stopwaitsecs=30" in diff and "+stopwaitsecs=35" in diff
    assert "WEB_GRACEFUL_TIMEOUT=<" in diff and "SECRET_KEY" not in diff
    for secret in ("s3cr%t-value", "s3cr%%t-value", "other-secret", "pw@127.0.0.1"):
        assert secret not in diff


def test_a_first_deploy_diffs_against_nothing():
    diff = config_diff(None, rendered(DeployConfig()))
    assert diff.startswith("--- live programs.conf") and "+[program:web-1]" in diff


def test_redact_keeps_every_key():
    text = redact(rendered(DeployConfig()))
    for key in ("PRAYER_ROOM_ENV_FILE", "HOME", "PORT", "WEB_WORKERS", "DJANGO_SETTINGS_MODULE"):
        assert f"    {key}=<" in text


def test_server_programs_run_current_as_the_app_user_with_the_config_values():
    text = rendered(DeployConfig(user="app", root="/opt/app", web_workers=3, worker_concurrency=4))
    assert "command=/opt/app/current/.venv/bin/python /opt/app/current/project/manage.py prodserver web" in text
    assert "directory=/opt/app/current/project" in text
    assert "user=app" in text
    assert 'WEB_WORKERS="3"' in text and 'WORKER_CONCURRENCY="4"' in text
    assert 'STATIC_ROOT="release"' in text  # each release collects its own (releases/<id>/static)
    assert 'DJANGO_SETTINGS_MODULE="prayer_room_api.settings.production"' in text
    assert 'PRAYER_ROOM_ENV_FILE="/opt/app/shared/env.effective"' in text
    # The env file's values are the effective env file's only: an env change leaves this text alone.
    assert "SECRET_KEY" not in text and "DATABASE_URL" not in text
    assert text == rendered(DeployConfig(user="app", root="/opt/app", web_workers=3, worker_concurrency=4), {})


def test_the_effective_env_file_holds_every_value_and_the_settings_read_it_back_exactly(tmp_path, monkeypatch):
    import environ

    config = DeployConfig(domain="p.example.org", acme_email="a@b.org", extra_env=(("FEATURE", "on"),))
    odd = {"ODD": "it's a $HOME #1 'x' \\n %(x)s", "SECURE_COOKIES": "false"}
    values = effective_environment(config, {**ENV, **odd})
    assert values["SECURE_COOKIES"] == "true" and values["WEB_WORKERS"] == str(config.web_workers)
    assert values["DJANGO_SETTINGS_MODULE"] == config.settings_module and values["FEATURE"] == "on"
    read: dict[str, str] = {"PORT": "8002"}  # a program's own value is kept
    monkeypatch.setattr(environ.Env, "ENVIRON", read)
    with open(tmp_path / "env", "w+") as file:
        file.write(render_effective_env({**values, "PORT": "1"}))
        file.seek(0)
        environ.Env.read_env(file)
    assert read == {**values, "PORT": "8002"}


@pytest.mark.parametrize("value, message", [("a\nb", "spans several lines"), ('"q"', "double quote")])
def test_a_value_the_file_cannot_hold_is_refused_by_name(value, message):
    with pytest.raises(DeployError, match=message) as info:
        render_effective_env({"SECRET_KEY": value})
    assert "SECRET_KEY" in str(info.value) and value not in str(info.value)


@pytest.mark.parametrize(
    "program, expected",
    [
        (None, ["prayer-room:web-1", "prayer-room:web-2", "prayer-room:worker", "prayer-room:beat"]),
        ("web", ["prayer-room:web-1", "prayer-room:web-2"]),
        ("web-2", ["prayer-room:web-2"]),
        ("beat", ["prayer-room:beat"]),
    ],
)
def test_program_selection(program, expected):
    assert list(Programs.from_config(DeployConfig()).select(program).all) == expected


def test_several_workers_and_an_unknown_program():
    programs = Programs.from_config(DeployConfig(workers=2))
    assert programs.others == ("prayer-room:worker-0", "prayer-room:worker-1", "prayer-room:beat")
    assert programs.select("worker").others == ("prayer-room:worker-0", "prayer-room:worker-1")
    with pytest.raises(DeployError, match="unknown program 'flower'"):
        programs.select("flower")


def test_env_file_format():
    text = "# comment\n\nSECRET_KEY=a=b#c\nexport DEBUG=false\nQUOTED=\"x y\"\nSINGLE='z'\nEMPTY=\n"
    assert read_env_file(text) == {"SECRET_KEY": "a=b#c", "DEBUG": "false", "QUOTED": "x y", "SINGLE": "z", "EMPTY": ""}
    with pytest.raises(ValueError, match="line 1"):
        read_env_file("not a pair\n")


@pytest.mark.parametrize(
    "allowed, host",
    [("example.org,www.example.org", "example.org"), (".example.org", "example.org"), ("*", "localhost")],
)
def test_health_check_host_header(allowed, host):
    assert health_host({"ALLOWED_HOSTS": allowed}) == host
