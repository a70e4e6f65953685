"""supervisord.conf.j2 rendering: what supervisord itself parses out of the rendered text."""

from pathlib import Path

import pytest
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ClientOptions, ServerOptions

from deploy.errors import DeployError
from deploy.render.jinja import supervisor_environment
from deploy.render.supervisord import local_context, render_supervisord_conf

TRICKY_VALUES = {
    "PERCENT": "50%(here)s%",
    "COMMA_EQ": "a,b=c",
    "DOUBLE": 'say "hi" now',
    "SINGLE": "it's",
    "HASH_SEMI": "x#y;z",
    "EMPTY": "",
    "SPACES": "two  words",
    "SECRET_KEY": "k8$^&*(-_=+)!@#%xy",
}


def parse(text: str, tmp_path: Path) -> ServerOptions:
    """Load `text` with supervisord's own option parser, as `supervisord -c` would."""
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "log").mkdir(exist_ok=True)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(text)
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    return options


def processes(options: ServerOptions) -> dict:
    return {p.name: p for group in options.process_group_configs for p in group.process_configs}


def test_local_config_is_complete_and_standalone(tmp_path):
    context = local_context(Path("/repo"), tmp_path, "/repo/.venv/bin/python")
    options = parse(render_supervisord_conf(context), tmp_path)
    assert [g.name for g in options.process_group_configs] == ["prayer-room"]
    procs = processes(options)
    assert sorted(procs) == ["beat", "web-1", "worker"]
    assert procs["web-1"].command == "/repo/.venv/bin/python /repo/project/manage.py prodserver web"
    assert procs["beat"].command.endswith("manage.py prodserver beat")
    assert procs["web-1"].environment["PORT"] == "8000"
    assert options.server_configs[0]["family"] == 1  # AF_UNIX: no inet_http_server
    assert options.server_configs[0]["file"] == str(tmp_path / "run" / "supervisor.sock")
    assert options.server_configs[0]["chmod"] == 0o700


def test_invoke_dev_config_streams_output_through_the_listener_and_guards_its_socket(tmp_path):
    plain = parse(render_supervisord_conf(local_context(Path("/repo"), tmp_path, "/py")), tmp_path)
    assert [g.name for g in plain.process_group_configs] == ["prayer-room"]  # no listener unless asked
    assert not any(p.stdout_events_enabled for p in processes(plain).values())

    context = local_context(
        Path("/repo"), tmp_path, "/py", stream_output=True, color=True, daemon_user="root", password="p%w"
    )
    options = parse(render_supervisord_conf(context), tmp_path)
    groups = {g.name: g for g in options.process_group_configs}
    assert sorted(groups) == ["output", "prayer-room"]
    (listener,) = groups["output"].process_configs
    assert listener.command == "/py /repo/deploy/logstream.py --color"
    assert listener.stderr_logfile == "/dev/stdout" and listener.stderr_logfile_maxbytes == 0
    assert groups["output"].priority < groups["prayer-room"].priority, "started first, stopped last"
    assert groups["output"].pool_events and groups["output"].buffer_size >= 1024
    assert all(p.stdout_events_enabled for p in groups["prayer-room"].process_configs)
    assert options.uid == 0  # user= said: no "running as root" CRIT
    assert options.silent and not plain.silent, "its own log off the terminal only with the listener"
    assert (options.server_configs[0]["username"], options.server_configs[0]["password"]) == ("dev", "p%w")
    client = ClientOptions()
    client.realize(args=["-c", str(tmp_path / "supervisord.conf")])
    assert (client.username, client.password) == ("dev", "p%w"), "supervisorctl signs in"


def test_environment_values_survive_supervisord_parsing(tmp_path):
    context = local_context(Path("/repo"), tmp_path, "/py", environment=TRICKY_VALUES)
    procs = processes(parse(render_supervisord_conf(context), tmp_path))
    for proc in procs.values():
        for key, value in TRICKY_VALUES.items():
            assert proc.environment[key] == value, key


def test_stop_semantics_per_process(tmp_path):
    context = local_context(Path("/repo"), tmp_path, "/py", task_time_limit=120, web_graceful_timeout=25)
    procs = processes(parse(render_supervisord_conf(context), tmp_path))
    worker, web, beat = procs["worker"], procs["web-1"], procs["beat"]
    assert worker.stopsignal == 15 and worker.stopwaitsecs > 120
    assert worker.environment["CELERY_TASK_TIME_LIMIT"] == "120"
    assert int(web.environment["WEB_GRACEFUL_TIMEOUT"]) == 25 < web.stopwaitsecs
    for proc in procs.values():
        assert proc.stopasgroup is False and proc.killasgroup is True
        assert proc.autorestart is RestartUnconditionally
        assert proc.stdout_logfile_maxbytes > 0 and proc.stdout_logfile_backups > 0
    assert beat.name == "beat"


def server_context(tmp_path, **changes):
    context = local_context(Path("/srv/app/current"), tmp_path, "/srv/app/current/.venv/bin/python")
    context.update(
        user="nobody",  # supervisord resolves user= when it parses: it must exist here
        home="/srv/app",
        processes={"web": 2, "worker": 3, "beat": 1},
        web_ports=(8001, 8002),
        supervisord=None,
    )
    context.update(changes)
    return context


def test_per_host_values_reach_each_program(tmp_path):
    text = render_supervisord_conf(server_context(tmp_path))
    (tmp_path / "programs.conf").write_text(text)
    main = local_context(Path("/x"), tmp_path, "/py")
    main.update(processes={}, supervisord={**main["supervisord"], "include": [str(tmp_path / "programs.conf")]})
    procs = processes(parse(render_supervisord_conf(main), tmp_path))
    assert sorted(procs) == ["beat", "web-1", "web-2", "worker-0", "worker-1", "worker-2"]
    assert procs["web-1"].environment["PORT"] == "8001"
    assert procs["web-2"].environment["PORT"] == "8002"
    for proc in procs.values():
        assert proc.uid == 65534
        assert proc.environment["HOME"] == "/srv/app"
        assert proc.environment["USER"] == "nobody"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"processes": {"web": 2, "worker": 1, "beat": 1, "flower": 1}}, "unknown program(s) flower"),
        ({"processes": {"web": 2, "worker": 1, "beat": 2}}, "beat count must be 1"),
        ({"processes": {"web": 1, "worker": 1, "beat": 1}}, "does not match the 2 web port"),
        ({"processes": {"web": 2, "worker": -1, "beat": 1}}, "whole number"),
        ({"processes": {"web": 2, "worker": "2", "beat": 1}}, "whole number"),
        ({"python": ""}, "missing python"),
        ({"manage": None}, "missing manage"),
        ({"task_time_limit": 0}, "task_time_limit must be a positive"),
        ({"environment": {"BAD KEY": "x"}}, "not valid"),
        ({"environment": {"MULTI": "a\nb"}}, "MULTI spans several lines"),
        ({"environment": {"COMMENT": "a ;b"}}, "COMMENT contains a space"),
        ({"environment": {"QUOTED": '"a"'}}, "QUOTED starts or ends with a quote"),
        ({"environment": {"BOTH": "a'b\"c"}}, "BOTH contains both kinds of quote"),
    ],
)
def test_bad_context_is_refused_with_a_clear_error(tmp_path, changes, message):
    with pytest.raises(DeployError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render_supervisord_conf(server_context(tmp_path, **changes))


def test_refused_values_are_named_not_printed():
    with pytest.raises(DeployError) as info:
        supervisor_environment({"SECRET_KEY": "hunter2\nsecret"})
    assert "SECRET_KEY" in str(info.value) and "hunter2" not in str(info.value)


def test_a_cluster_host_gets_only_the_programs_of_its_roles():
    from deploy.config import DeployConfig
    from deploy.processes import Programs
    from deploy.render.supervisord import server_context as context_of

    roles = (("web", ("root@10.0.0.2",)), ("worker", ("root@10.0.0.4",)), ("beat", ("root@10.0.0.4",)))
    cluster = DeployConfig(name="c", roles=roles)
    worker_host = cluster.for_host("root@10.0.0.4")
    text = render_supervisord_conf(context_of(worker_host, {}, web_ports=worker_host.web_ports))
    assert "[program:web-" not in text and "[program:worker]" in text and "[program:beat]" in text
    assert "programs=worker,beat" in text and 'WORKER_QUEUES="celery,host.10.0.0.4"' in text
    assert Programs.from_config(worker_host).all == ("prayer-room:worker", "prayer-room:beat")
    web_host = cluster.for_host("root@10.0.0.2")
    text = render_supervisord_conf(context_of(web_host, {}, web_ports=web_host.web_ports))
    assert "programs=web-1,web-2" in text and "[program:beat]" not in text
    assert Programs.from_config(web_host).others == ()
