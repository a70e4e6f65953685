"""Root's prayer-room-manage, rendered and run here against a stub python: on root's terminal the command gets a
terminal of its own, so a keystroke it pushes (TIOCSTI) never reaches root's shell; piped, stdin, stdout and the
exit code pass through unchanged."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.config import DeployConfig
from deploy.render.programs_env import render_manage_script
from tests.support.pty_session import PtySession

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runuser"), reason="runs the command as another user: needs root, runuser"
)

APP_USER = "nobody"
# manage.py ARGS as the stub sees them: `inject` pushes Z into its stdin's terminal, `echo` copies stdin, exits 7.
STUB_PYTHON = """#!/bin/sh
shift
case "$1" in
inject) exec /usr/bin/python3 -c 'import fcntl, termios; fcntl.ioctl(0, termios.TIOCSTI, b"Z")' ;;
echo) cat; echo "to stderr" >&2; exit 7 ;;
esac
exit 64
"""


@pytest.fixture
def manage() -> Iterator[Path]:
    """The rendered script, its env file and a release whose python is the stub, in a directory the app user can
    traverse."""
    root = Path(tempfile.mkdtemp(prefix="prayer-room-manage-"))
    os.chmod(root, 0o755)
    config = DeployConfig(root=str(root), user=APP_USER)
    layout = config.layout
    project = Path(str(layout.current)) / "project"
    project.mkdir(parents=True)
    python = Path(str(layout.current)) / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    env_file = Path(str(layout.effective_env))
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text("DJANGO_SETTINGS_MODULE='config.settings'\n")
    for path in [*project.parents, python.parent]:
        if root in path.parents or path == root:
            path.chmod(0o755)
    script = root / "prayer-room-manage"
    script.write_text(render_manage_script(config, pwd.getpwnam(APP_USER).pw_dir))
    script.chmod(0o755)
    yield script
    shutil.rmtree(root)


def pushed_into_roots_terminal(script: Path) -> str:
    """Root's shell on a pty runs `script inject`, then reads one key: the one the command pushed, if any reached
    root's terminal, else the M typed after the command ended."""
    shell = f'{script} inject; echo ended=$?; read -r -n 1 key; echo "read=[$key]"'
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "xterm"}
    session = PtySession(["/bin/bash", "--norc", "-c", shell], env=env)
    session.expect("ended=", timeout=30)
    assert session.expect("\n", timeout=30).strip() == "0"
    session.send("M")
    seen = session.expect("]", timeout=30)
    assert session.wait(timeout=30) == 0
    return seen.rsplit("read=[", 1)[1][0]


def test_a_keystroke_pushed_by_the_command_on_roots_terminal_does_not_reach_roots_shell(manage):
    assert "--pty" in manage.read_text()
    assert pushed_into_roots_terminal(manage) == "M"
    # Positive control: the same script without --pty gives the command root's terminal; the key reaches root.
    manage.write_text(manage.read_text().replace("pty=--pty", "pty="))
    assert pushed_into_roots_terminal(manage) == "Z"


def test_piped_stdin_stdout_stderr_and_the_exit_code_pass_through_unchanged(manage):
    result = subprocess.run([str(manage), "echo"], input=b"line one\nline two\n", capture_output=True, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (7, b"line one\nline two\n", b"to stderr\n")
