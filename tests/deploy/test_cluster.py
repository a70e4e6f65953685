"""The cluster's plan of action without a server: the order hosts switch in, failures collected per host,
and the fab commands that refuse to act on one host of a cluster."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fabric import Connection

from deploy.config import has_app, load_config
from deploy.errors import DeployError
from deploy.progress import in_parallel
from deploy.site import rollout_order
from deploy.ssh import Server
from deploy.state import ServerState

REPO = Path(__file__).resolve().parents[2]
CLUSTER = """
[environments.cluster.roles]
worker = ["root@10.0.0.4", "root@10.0.0.3"]
beat = ["root@10.0.0.5", "root@10.0.0.2"]
web = ["root@10.0.0.2", "root@10.0.0.3"]
db = ["root@10.0.0.4"]
balancer = ["root@10.0.0.9"]
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(CLUSTER)
    return path


def test_web_hosts_switch_first_one_at_a_time_then_workers_then_beat(config_file):
    config = load_config(config_file, "cluster")
    apps = [h for h in config.site_hosts if has_app(config.for_host(h))]
    assert "root@10.0.0.9" not in apps  # the balancer runs no programs
    assert rollout_order(config, apps) == ["root@10.0.0.2", "root@10.0.0.3", "root@10.0.0.4", "root@10.0.0.5"]
    assert config.primary == "root@10.0.0.2"
    assert has_app(config.for_host("root@10.0.0.4")) and not has_app(config.for_host("root@10.0.0.9"))


def test_parallel_actions_run_at_once_and_every_failure_is_named():
    started = threading.Barrier(3, timeout=5)  # all three must be running together to pass it

    def action(name: str) -> str:
        started.wait()
        if name != "b":
            raise DeployError(f"{name} broke")
        return name

    with pytest.raises(DeployError) as caught:
        in_parallel(action, ["a", "b", "c"], name=lambda n: f"host-{n}")
    assert str(caught.value) == "host-a: a broke | host-c: c broke"
    assert in_parallel(lambda n: n * 2, ["x", "y"], name=str) == ["xx", "yy"]


@pytest.mark.parametrize("task", ["deploy", "rollback"])
def test_one_host_of_a_cluster_is_not_deployed_or_rolled_back_alone(config_file, task):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("fab")), "-r", str(REPO), "-H", "root@10.0.0.3", task, "--env", "cluster",
         "--config", str(config_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {task} acts on every host of the environment cluster at once: leave -H out."
    ), result.stderr


def test_a_host_outside_the_cluster_is_refused(config_file):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("fab")), "-r", str(REPO), "-H", "root@10.0.0.77", "status", "--env",
         "cluster", "--config", str(config_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "10.0.0.77 is not a host of the environment cluster" in result.stderr


def test_an_unreachable_cluster_is_refused_naming_every_host_before_anything_changes(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(
        "[environments.down.roles]\n"
        'web = ["root@127.0.0.2:1", "root@127.0.0.3:1"]\nworker = ["root@127.0.0.3:1"]\nbeat = ["root@127.0.0.2:1"]\n'
    )
    started = time.monotonic()
    result = subprocess.run(
        [str(Path(sys.executable).with_name("fab")), "-r", str(REPO), "deploy", "--env", "down", "--config", str(path),
         "--repo", str(REPO), "--allow-dirty"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and time.monotonic() - started < 60
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for host in ("root@127.0.0.2:1", "root@127.0.0.3:1"):
        assert f"{host}: root@{host.split('@')[1].split(':')[0]}:1: cannot connect over SSH" in lines[0], lines[0]


def fab(config_file: Path, *args: str) -> subprocess.CompletedProcess:
    """`fab ARGS --env cluster --config CONFIG_FILE` with this repository's fabfile."""
    argv = [str(Path(sys.executable).with_name("fab")), "-r", str(REPO), *args, "--env", "cluster"]
    return subprocess.run([*argv, "--config", str(config_file)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("-H", "root@10.0.0.3", "backups"),
            "the backups and the history are kept on the primary of cluster, root@10.0.0.2: use -H",
        ),
        (("-H", "root@10.0.0.3", "manage", "check"), "manage.py runs on the primary of cluster, root@10.0.0.2: use -H"),
        (("-H", "root@10.0.0.5", "shell"), "manage.py runs on the primary of cluster, root@10.0.0.2: use -H"),
        (("-H", "root@10.0.0.3", "restore", "x.dump"), "restore acts on every host of the environment cluster at once"),
        (("logs", "--follow", "--role", "web"), "--follow streams one host's logs: add -H user@host"),
        (("status", "--role", "db"), "unknown role 'db' for programs; roles: web, worker, beat."),
    ],
)
def test_commands_that_cannot_act_on_these_hosts_are_refused_before_connecting(config_file, args, message):
    result = fab(config_file, *args)
    assert result.returncode == 1 and result.stderr.startswith(f"error: {message}"), result.stderr


MANAGED = """
[environments.managed.roles]
web = ["root@10.0.0.2", "root@10.0.0.3"]
worker = ["root@10.0.0.3"]
beat = ["root@10.0.0.2"]
"""


def server_state(**fields) -> ServerState:
    values = dict(
        releases=(), deployed=frozenset(), current=None, venvs={}, ready_venvs=frozenset(), root_exists=True,
        supervisord_up=False, env_text=None, live_programs=None, beat_log_size=0,
    )  # fmt: skip
    return ServerState(**{**values, **fields})


def test_an_env_change_needs_only_the_env_file_on_a_host_with_no_live_release(tmp_path):
    """The primary of a cluster without a db host, after provision stopped for the service URLs: app user, layout and
    env file, no supervisord yet. `fab env --set` may put the URLs there (nothing restarts); a live host must still
    be provisioned as deploy needs it, and a host without the env file is refused naming provision."""
    path = tmp_path / "deploy.toml"
    path.write_text(MANAGED)
    config = load_config(path, "managed")
    server = Server(Connection("10.0.0.2", user="root"), config.for_host("root@10.0.0.2"), True, False, "/root")
    prepared = server_state(env_text="SECRET_KEY=x\n")
    prepared.require_env_editable(server)
    with pytest.raises(DeployError, match="supervisord is not answering"):  # the positive control: deploy's check
        prepared.require_provisioned(server)
    with pytest.raises(DeployError, match="supervisord is not answering"):
        server_state(env_text="SECRET_KEY=x\n", current="20260101-000000").require_env_editable(server)
    with pytest.raises(DeployError, match=r"has no env file at /srv/prayer-room/shared/env; run `fab provision`"):
        server_state().require_env_editable(server)
    with pytest.raises(DeployError, match="has no env file"):
        server_state(root_exists=False, env_text="SECRET_KEY=x\n").require_env_editable(server)
    with pytest.raises(DeployError, match="must be root's"):
        server_state(env_text="SECRET_KEY=x\n", unsafe_dirs=("/srv/prayer-room",)).require_env_editable(server)
