"""deploy/logstream.py: supervisord's PROCESS_LOG events turned into name-prefixed lines, as `invoke dev` shows."""

import io

from deploy.logstream import Prefixer, listen


def event(process: str, data: str, serial: int = 1) -> str:
    """One event as supervisord sends it: a header line, then `len` characters of payload."""
    payload = f"processname:{process} groupname:prayer-room pid:42 channel:stdout\n{data}"
    return (
        f"ver:3.0 server:supervisor serial:{serial} pool:output poolserial:{serial} "
        f"eventname:PROCESS_LOG_STDOUT len:{len(payload)}\n{payload}"
    )


def test_events_become_whole_lines_prefixed_with_the_program_name():
    stdin = io.StringIO(
        event("web-1", "Listening at: http://127.0.0.1:8000\nBooting wor")
        + event("worker", "celery@vm ready. Gebet für Anna ✓\n", 2)  # len counts characters, not bytes
        + event("web-1", "ker with pid: 7\n", 3)
    )
    stdout, out = io.StringIO(), io.BytesIO()
    listen(stdin, stdout, Prefixer(out))
    assert out.getvalue().decode().splitlines() == [
        "web-1   | Listening at: http://127.0.0.1:8000",
        "worker  | celery@vm ready. Gebet für Anna ✓",
        "web-1   | Booting worker with pid: 7",
    ]
    assert stdout.getvalue() == "READY\n" + "RESULT 2\nOKREADY\n" * 3, "each event acknowledged"


def test_state_changes_of_the_programs_are_shown_but_not_the_listeners_own(monkeypatch):
    monkeypatch.setenv("SUPERVISOR_PROCESS_NAME", "output")

    def state(name: str, state: str, serial: int) -> str:
        payload = f"processname:{name} groupname:g from_state:STARTING pid:7"
        return f"ver:3.0 serial:{serial} eventname:PROCESS_STATE_{state} len:{len(payload)}\n{payload}"

    stdin = io.StringIO(state("worker", "RUNNING", 1) + state("output", "RUNNING", 2) + state("beat", "STARTING", 3))
    out = io.BytesIO()
    listen(stdin, io.StringIO(), Prefixer(out))
    assert out.getvalue().decode() == "worker  | [supervisord] running (pid 7)\n"


def test_colored_prefixes_differ_per_program():
    out = io.BytesIO()
    prefixer = Prefixer(out, color=True)
    prefixer.feed("web-1", b"a\n")
    prefixer.feed("beat", b"b\r\n")
    web, beat = out.getvalue().split(b"\n")[:2]
    assert web.startswith(b"\033[36mweb-1") and beat.startswith(b"\033[33mbeat")
    assert web.endswith(b"|\033[0m a") and beat.endswith(b"|\033[0m b"), "the carriage return dropped"
