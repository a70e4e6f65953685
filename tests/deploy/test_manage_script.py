"""Root's prayer-room-manage, rendered and run here against a stub python: a keystroke the command pushes (TIOCSTI)
never reaches root's shell, on root's terminal (a terminal of its own) nor redirected with root's terminal still
its stderr (a session of its own); piped, stdin, stdout and the exit code pass through unchanged; Ctrl-C ends it."""

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
# manage.py ARGS as the stub sees them: `inject` pushes Z into the first of its stdin, stdout, stderr that is a
# terminal and says whether the kernel let it; `echo` copies stdin, exits 7; `hold` says its pid, then waits.
INJECT = """
import fcntl, os, sys, termios
fd = next(fd for fd in (0, 1, 2) if os.isatty(fd))
try:
    fcntl.ioctl(fd, termios.TIOCSTI, b"Z")
except OSError as exc:
    sys.exit(f"inject: refused ({exc.strerror})")
print("inject: pushed", file=sys.stderr)
"""
STUB_PYTHON = f"""#!/bin/sh
shift
case "$1" in
inject) exec /usr/bin/python3 -c '{INJECT}' ;;
echo) cat; echo "to stderr" >&2; exit 7 ;;
hold) echo "holding $$" >&2; exec sleep 600 ;;
esac
exit 64
"""
# The script's last line before the command got a session of its own: piped or redirected, root's session.
OWN_SESSION = f"""exec runuser -s /bin/sh -c 'exec "$@"' -- {APP_USER} prayer-room-manage "$@"\n"""
ROOTS_SESSION = f"""exec runuser -u {APP_USER} -- "$@"\n"""
ROOTS_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "xterm"}


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


def pushed_into_roots_terminal(script: Path, redirect: str = "") -> tuple[str, str]:
    """Root's shell on a pty runs `script inject REDIRECT`, then reads one key: (what the command says of its push,
    the key: the one the command pushed, if any reached root's terminal, else the M typed after the command)."""
    shell = f'{script} inject {redirect}; echo ended; read -r -n 1 key; echo "read=[$key]"'
    session = PtySession(["/bin/bash", "--norc", "-c", shell], env=ROOTS_ENV)
    session.expect("inject: ", timeout=30)
    outcome = session.expect("\n", timeout=30)
    session.expect("ended", timeout=30)
    session.send("M")
    seen = session.expect("]", timeout=30)
    assert session.wait(timeout=30) == 0
    return outcome.strip(), seen.rsplit("read=[", 1)[1][0]


def without_own_session(script: Path) -> None:
    """The script as it was before a redirected command got a session of its own (runuser -u: root's session)."""
    text = script.read_text()
    assert OWN_SESSION in text
    script.write_text(text.replace(OWN_SESSION, ROOTS_SESSION))


def test_a_keystroke_pushed_by_the_command_on_roots_terminal_does_not_reach_roots_shell(manage):
    assert "--pty" in manage.read_text()
    assert pushed_into_roots_terminal(manage) == ("pushed", "M")  # into its own terminal
    # Positive control: the same script without --pty gives the command root's terminal; the key reaches root.
    manage.write_text(manage.read_text().replace("runuser --pty", "runuser"))
    assert pushed_into_roots_terminal(manage) == ("pushed", "Z")


REDIRECTS = {"stdout to a file": "> {out}", "stdout to a pipe": "| cat", "stdin from a file": "< /dev/null"}


@pytest.mark.parametrize("redirect", REDIRECTS.values(), ids=REDIRECTS.keys())
def test_redirected_on_roots_terminal_a_pushed_keystroke_does_not_reach_roots_shell(manage, redirect):
    """Stdin or stdout redirected, the rest still root's terminal: the command has no controlling terminal, so the
    kernel refuses its push."""
    redirect = redirect.format(out=manage.parent / "out")
    assert pushed_into_roots_terminal(manage, redirect) == ("refused (Operation not permitted)", "M")
    # Positive control: in root's session (the script before), root's terminal is the command's; the key reaches it.
    without_own_session(manage)
    assert pushed_into_roots_terminal(manage, redirect) == ("pushed", "Z")


def test_piped_stdin_stdout_stderr_and_the_exit_code_pass_through_unchanged(manage):
    result = subprocess.run([str(manage), "echo"], input=b"line one\nline two\n", capture_output=True, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (7, b"line one\nline two\n", b"to stderr\n")


def test_piped_on_roots_terminal_stdin_stdout_and_the_exit_code_pass_through_stderr_shows(manage):
    out = manage.parent / "out"
    shell = f"printf 'line one\\nline two\\n' | {manage} echo > {out}; echo ended=$?"
    session = PtySession(["/bin/bash", "--norc", "-c", shell], env=ROOTS_ENV)
    session.expect("to stderr", timeout=30)
    session.expect("ended=", timeout=30)
    assert session.expect("\n", timeout=30).strip() == "7"
    assert session.wait(timeout=30) == 0
    assert out.read_bytes() == b"line one\nline two\n"  # no CR: no terminal in between


def running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_ctrl_c_on_roots_terminal_ends_a_redirected_command(manage):
    """The command is in a session of its own, out of reach of root's terminal's Ctrl-C; runuser, still in root's,
    ends it and exits as interrupted."""
    shell = f"trap 'echo interrupted' INT; {manage} hold > {manage.parent / 'out'}; echo ended=$?"
    session = PtySession(["/bin/bash", "--norc", "-c", shell], env=ROOTS_ENV)
    session.expect("holding ", timeout=30)
    pid = int(session.expect("\n", timeout=30))
    assert running(pid) and os.getsid(pid) not in (os.getsid(session.pid), os.getsid(0))
    session.send("\x03")
    session.expect("ended=", timeout=30)
    assert session.expect("\n", timeout=30).strip() == "130"
    assert session.wait(timeout=30) == 0
    assert not running(pid)
