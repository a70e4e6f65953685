"""The command lines the kit runs on servers, built without a server: exactly what each step will run."""

import dataclasses
import shlex
from pathlib import PurePosixPath

from deploy.commands import backup, helpers, lock, logs, release, supervisor, users, verify
from deploy.config import DeployConfig, load_config
from deploy.on_server import script

CONFIG = DeployConfig()
RELEASE_DIR = CONFIG.layout.releases / "20260101000000-abc"
ENV_FILE = str(CONFIG.layout.env_file)
OVERLAY = " ".join(
    [f"--default={k}={v}" for k, v in CONFIG.environment_defaults()]
    + [f"--set={k}={v}" for k, v in CONFIG.environment_overrides()]
)


def readable(command: str) -> str:
    """A root helper command line with its script shown as SCRIPT."""
    return command.replace(shlex.quote(script("root_helper")), "SCRIPT")


def app_helper_parts(command: str) -> tuple[list[str], str]:
    """(the runuser argv up to `sh -c`, the inner command with the app helper's script shown as SCRIPT)."""
    words = shlex.split(command)
    inner = words[-1].replace(shlex.quote(script("app_helper")), "SCRIPT")
    return words[:-1], inner


def test_the_app_helper_runs_in_the_release_with_its_python_as_the_app_user():
    outer, inner = app_helper_parts(helpers.app_helper(CONFIG, RELEASE_DIR, "migrations", app_home="/home/app"))
    assert outer == ["runuser", "-u", "prayer-room", "--", "env", "HOME=/home/app", "USER=prayer-room", "sh", "-c"]
    assert inner == f"cd {RELEASE_DIR} && .venv/bin/python -c SCRIPT --env-file {ENV_FILE} {OVERLAY} migrations"


def test_prepare_runs_as_the_build_user_with_the_app_group_and_umask_022():
    command = helpers.app_helper(CONFIG, RELEASE_DIR, "prepare", "--stage", "before", app_home="/x", build=True)
    outer, inner = app_helper_parts(command)
    assert outer == [
        "runuser", "-u", "prayer-room-build", "-g", "prayer-room-build", "-G", "prayer-room", "--",
        "env", "HOME=/nonexistent", "USER=prayer-room-build", "sh", "-c",
    ]  # fmt: skip
    assert inner == (
        f"umask 022 && cd {RELEASE_DIR} && .venv/bin/python -c SCRIPT --env-file {ENV_FILE} {OVERLAY} "
        "prepare --stage before"
    )


def test_one_builder_makes_every_helper_command_line():
    assert helpers.helper_argv("python3", "root_helper", "backups", "--dir", PurePosixPath("/b"), env_file="/e") == [
        "python3", "-c", script("root_helper"), "--env-file", "/e", "backups", "--dir", "/b",
    ]  # fmt: skip
    assert helpers.helper_argv("py", "app_helper", "ping")[:3] == ["py", "-c", script("app_helper")]


def test_backups_run_the_root_helper_with_the_servers_python3_and_postgres_bin():
    config = dataclasses.replace(CONFIG, postgres_bin="/usr/lib/postgresql/15/bin", backup_keep=3)
    pg = "--pg-bin /usr/lib/postgresql/15/bin"
    assert readable(backup.take(config, "deploy", "r1")) == (
        f"python3 -c SCRIPT --env-file {ENV_FILE} backup --dir /var/backups/prayer-room --kind deploy --release r1 "
        f"--keep 3 {pg}"
    )
    assert readable(backup.take(CONFIG, "manual", None)).endswith("--kind manual --release '' --keep 14")
    assert readable(backup.listing(config)) == f"python3 -c SCRIPT --env-file {ENV_FILE} backups --dir " + (
        f"/var/backups/prayer-room {pg}"
    )
    assert readable(backup.restore(CONFIG, "x.dump", "public_before_restore_1")) == (
        f"python3 -c SCRIPT --env-file {ENV_FILE} restore --dir /var/backups/prayer-room x.dump "
        f"--as-user {CONFIG.build_user} --aside public_before_restore_1"
    )
    assert readable(backup.recover(CONFIG, "public_before_restore_1")) == (
        f"python3 -c SCRIPT --env-file {ENV_FILE} recover --dir /var/backups/prayer-room "
        f"--as-user {CONFIG.build_user} --put-back public_before_restore_1"
    )
    assert readable(backup.recover(CONFIG, check=True)) == (  # deploy's, rollback's and status's look, read-only
        f"python3 -c SCRIPT --env-file {ENV_FILE} recover --dir /var/backups/prayer-room "
        f"--as-user {CONFIG.build_user} --check"
    )
    assert backup.stage_download(CONFIG, "x.dump", "/tmp/tmp.1", "deployer") == (
        "cp /var/backups/prayer-room/x.dump /tmp/tmp.1 && chown deployer /tmp/tmp.1"
    )


def test_supervisord_commands_use_its_absolute_config_and_socket():
    assert supervisor.supervisorctl(CONFIG, "status") == ("supervisorctl -c /etc/prayer-room/supervisord.conf status")
    assert readable(supervisor.cycle(CONFIG, "prayer-room:web-1", "prayer-room:beat")) == (
        "python3 -c SCRIPT cycle --socket /run/prayer-room/supervisor.sock prayer-room:web-1 prayer-room:beat"
    )
    wait = supervisor.wait_running(CONFIG, ("prayer-room:worker", "prayer-room:beat"), timeout=30)
    assert wait.startswith("end=$(( $(date +%s) + 30 )); while :; do out=$(supervisorctl -c ")
    assert '[ "$n" -ge 2 ] && exit 0' in wait


def test_the_ping_goes_to_the_hosts_own_queue_only_when_its_workers_consume_it(tmp_path):
    _, inner = app_helper_parts(verify.ping(CONFIG, RELEASE_DIR, "r2", "/home/app"))
    assert inner.endswith(f"{OVERLAY} ping --expect r2 --timeout 60")
    path = tmp_path / "deploy.toml"
    path.write_text(
        '[environments.c.roles]\nweb = ["root@10.0.0.2"]\nworker = ["root@10.0.0.3"]\nbeat = ["root@10.0.0.2"]\n'
    )
    host = load_config(path, "c").for_host("root@10.0.0.3")
    with_queue = verify.ping(host, RELEASE_DIR, "r2", "/h", programs_text="-Q celery,host.10.0.0.3")
    assert app_helper_parts(with_queue)[1].endswith("ping --expect r2 --timeout 60 --queue host.10.0.0.3")
    assert app_helper_parts(verify.ping(host, RELEASE_DIR, "r2", "/h"))[1].endswith("--timeout 60")


def test_switch_renames_new_symlinks_over_current_and_previous():
    assert release.switch(CONFIG.layout, "r2") == (
        '{ old="$(readlink /srv/prayer-room/current)"; if [ -n "$old" ] && [ "$old" != /srv/prayer-room/releases/r2 ]; '
        'then ln -sfn "$old" /srv/prayer-room/.previous-r2 && mv -T /srv/prayer-room/.previous-r2 '
        "/srv/prayer-room/previous; fi; } && ln -sfn /srv/prayer-room/releases/r2 /srv/prayer-room/.current-r2 && "
        "mv -T /srv/prayer-room/.current-r2 /srv/prayer-room/current"
    )


def test_the_venv_is_built_by_the_build_user_from_wheels_then_handed_to_root():
    venv = CONFIG.layout.venvs / "0123abcd"
    kill = "{ runuser -u prayer-room-build -- sh -c 'kill -KILL -1' 2>/dev/null; true; }"
    assert release.venv_directory(venv, "prayer-room-build").split(" && ") == [
        "cd /",
        "umask 022",
        kill,
        "rm -rf /srv/prayer-room/venvs/0123abcd",
        "install -d -o prayer-room-build -g prayer-room-build -m 755 /srv/prayer-room/venvs/0123abcd",
    ]
    assert release.build_venv(CONFIG, venv, "/srv/prayer-room/releases/r2/requirements.lock") == (
        "cd / && python3 -m venv /srv/prayer-room/venvs/0123abcd"
        " && /srv/prayer-room/venvs/0123abcd/bin/pip install --quiet --disable-pip-version-check --no-cache-dir "
        "--only-binary :all: --require-hashes --no-deps -r /srv/prayer-room/releases/r2/requirements.lock"
    )
    assert (
        release.check_venv(venv) == "cd / && /srv/prayer-room/venvs/0123abcd/bin/pip check --disable-pip-version-check"
    )
    assert release.venv_runs(venv) == "cd / && /srv/prayer-room/venvs/0123abcd/bin/python -c pass"
    assert release.hand_over_venv(venv, "prayer-room-build", ".complete").split(" && ") == [
        "cd /",
        kill,
        "chown -R -h root:root /srv/prayer-room/venvs/0123abcd",
        "chmod -R go-w,ug-s /srv/prayer-room/venvs/0123abcd",
        'test -z "$(find /srv/prayer-room/venvs/0123abcd ! -user root -print -quit)"',
        "touch /srv/prayer-room/venvs/0123abcd/.complete",
    ]


def test_a_release_is_unpacked_root_owned_with_its_venv_linked():
    tarball = CONFIG.layout.releases / ".r2.tar"
    command = release.unpack(CONFIG.layout, "r2", tarball, CONFIG.layout.venvs / "v1", "prayer-room-build")
    assert command.split(" && ") == [
        "umask 022",
        "install -d -o root -g root -m 755 /srv/prayer-room/releases /srv/prayer-room/venvs "
        "/srv/prayer-room/releases/r2",
        "tar -xf /srv/prayer-room/releases/.r2.tar -C /srv/prayer-room/releases/r2 --no-same-owner "
        "--no-same-permissions",
        "rm -f /srv/prayer-room/releases/.r2.tar",
        "ln -sfn /srv/prayer-room/venvs/v1 /srv/prayer-room/releases/r2/.venv",
        f"install -d -o prayer-room-build -g prayer-room-build -m 755 {CONFIG.layout.static('r2')}",
    ]


def test_the_lock_changes_only_under_its_guards_flock_and_only_when_ours():
    path = CONFIG.layout.lock
    guard = f"flock -w 30 {path.parent}/.{path.name}.guard sh -c"
    ours = f"grep -qF tok {path}/owner 2>/dev/null"
    assert lock.refresh(path, "tok") == f"{guard} '{ours} && touch {path}/owner'"
    assert lock.release(path, "tok") == f"{guard} 'if {ours}; then rm -rf {path}; fi'"
    assert lock.break_lock(path) == f"{guard} 'rm -rf {path}'"
    acquire = shlex.split(lock.acquire(path, '{"holder": "me"}', 600))
    assert acquire[:5] == ["flock", "-w", "30", f"{path.parent}/.{path.name}.guard", "sh"]
    assert acquire[6].startswith(f'if mkdir {path} 2>/dev/null; then printf %s \'{{"holder": "me"}}\' > {path}/owner')
    assert 'if [ "$idle" -gt 600 ]; then' in acquire[6]


def test_logs_are_tailed_or_followed_across_rotations():
    paths = [PurePosixPath("/var/log/a.log"), PurePosixPath("/var/log/b c.log")]
    assert logs.tail(paths, 100) == "tail -n 100 /var/log/a.log '/var/log/b c.log'"
    assert logs.tail(paths[:1], 5, follow=True) == "tail -n 5 -F /var/log/a.log"
    assert logs.since(paths[0], 42) == (
        'f=/var/log/a.log; o=43; [ $(stat -c %s "$f") -lt 42 ] && o=1; tail -c +$o "$f"'
    )


def test_root_runs_as_itself_or_through_sudo():
    assert users.as_root("id -u", is_root=True, sudo_password=False) == "id -u"
    assert users.as_root("id -u", is_root=False, sudo_password=False) == "sudo -n sh -c 'id -u'"
    assert users.as_root("id -u", is_root=False, sudo_password=True) == "sh -c 'id -u'"
