"""Local tasks (`invoke --list`): thin wrappers over the project's manage.py and the deploy library."""

import os
import random
import shlex
import sys
from pathlib import Path

from invoke import Collection, Exit, task

from deploy.errors import DeployError
from deploy.terminal import LocalRunner

REPO = Path(__file__).resolve().parent
MANAGE = f"{sys.executable} {REPO / 'project' / 'manage.py'}"


@task
def dev(c, port=8000, demo=True):
    """Run web + worker + beat under supervisord until Ctrl-C, their output here (--no-demo: no demo data).

    First it migrates, collects the static files into var/static (WhiteNoise serves them) and seeds the
    schedules; an empty database (no location yet) gets demo data and a staff account.
    """
    from deploy import local

    var = local.var_dir()
    os.environ["VAR_DIR"] = str(var)
    c.run(f"{MANAGE} migrate --noinput --verbosity 0")
    c.run(f"{MANAGE} collectstatic --noinput --verbosity 0")
    seed(c)
    if demo:
        c.run(f"{MANAGE} demo_data --if-empty")
    try:
        config = local.write_dev_config(port, color=sys.stdout.isatty())
        print(
            f"\nweb on http://127.0.0.1:{port}/ (API docs; admin at /admin/), worker and beat: their output follows,"
            f" each line prefixed with its name;\nlogs also in {var / 'log'}. Ctrl-C stops all three.\n",
            flush=True,
        )
        local.exec_supervisord(config)
    except DeployError as exc:
        raise Exit(str(exc), code=1) from exc


@task
def migrate(c):
    """Apply database migrations (SQLite in var/ unless DATABASE_URL says otherwise)."""
    c.run(f"{MANAGE} migrate --noinput")


@task
def seed(c, check=False):
    """Create the declared periodic schedules that are missing; --check reports drift."""
    c.run(f"{MANAGE} seed_schedules{' --check' if check else ''}")


END_TO_END_LAYERS = "integration or deploy or browser or faults"
# The end-to-end layers in two streams side by side: the deploy layer's first part (its test servers, mostly waited
# on) in one; in the other the layers that run the processes on this machine, then the deploy layer's second part.
# No two sessions share a server, a port or a directory (test containers claim their subnets; see nspawn.py).
SERVER_LAYER = "deploy"
LOCAL_LAYERS = "integration or browser or faults"
# The deploy layer's second part, balanced by the module times each session prints at its end (a new deploy module
# runs in the first part until it is listed here).
SECOND_DEPLOY_PART = (
    "tests/deploy/test_security_e2e.py",
    "tests/deploy/test_tls_e2e.py",
    "tests/deploy/test_archive_e2e.py",
    "tests/deploy/test_data_e2e.py",
)
NO_TESTS_COLLECTED = 5  # pytest's exit code when the selection is empty


@task
def test(c, k="", unit=False, seed=0, serial=False):
    """Run the unit layer in a random order (--seed N repeats one), then the end-to-end layers in file order.

    -k EXPR selects tests; --unit runs the unit layer only. The end-to-end modules share booted servers and some
    of their tests follow each other, so pytest-randomly (off by default in pyproject.toml) shuffles only the first.
    The deploy layer runs beside the other end-to-end layers, whose output follows once both are done; --serial runs
    them one after the other.
    """
    seed = seed or random.SystemRandom().randrange(1, 2**32)
    selection = f" -k {shlex.quote(k)}" if k else ""
    print(f"== unit layer, shuffled with seed {seed} (this order again: invoke test --unit --seed {seed})", flush=True)
    unit_layer = shlex.quote(f"not ({END_TO_END_LAYERS})")
    codes = [run_pytest(c, f"-p randomly --randomly-seed={seed} -m {unit_layer}{selection}")]
    if not unit and serial:
        print("== end-to-end layers, in file order (the 30 slowest steps listed at the end)", flush=True)
        codes.append(run_pytest(c, f"-m {shlex.quote(END_TO_END_LAYERS)} --durations=30{selection}"))
    elif not unit:
        codes += run_side_by_side(c, selection)
    ran = [code for code in codes if code != NO_TESTS_COLLECTED]
    failed = [code for code in ran if code]
    if failed or not ran:
        raise Exit(code=failed[0] if failed else NO_TESTS_COLLECTED)


def run_side_by_side(c, selection: str) -> list[int]:
    """Two streams: the deploy layer's first part in the foreground; in the background (output to files, printed
    when both are done) the local layers, then the deploy layer's second part. The exit codes of the three."""
    import subprocess
    import tempfile
    import threading

    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    background = {
        LOCAL_LAYERS: [*pytest, "-m", LOCAL_LAYERS, "--durations=15", *shlex.split(selection)],
        f"{SERVER_LAYER}, second part": [*pytest, "-m", SERVER_LAYER, "--durations=20", *shlex.split(selection),
                                         *SECOND_DEPLOY_PART],
    }  # fmt: skip
    codes: dict[str, int] = {}
    outputs = {name: tempfile.TemporaryFile("w+") for name in background}
    running: list[subprocess.Popen] = []
    stopped = False
    lock = threading.Lock()  # no session starts once the foreground one is over or interrupted

    def one_after_the_other() -> None:
        for name, argv in background.items():
            with lock:
                if stopped:
                    return
                process = subprocess.Popen(argv, stdout=outputs[name], stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)  # fmt: skip
                running.append(process)
            codes[name] = process.wait()

    print(f"== end-to-end layers in the background, one after the other: {', '.join(background)} (printed when done)",
          flush=True)  # fmt: skip
    stream = threading.Thread(target=one_after_the_other, name="background-layers")
    stream.start()
    try:
        ignored = " ".join(f"--ignore={path}" for path in SECOND_DEPLOY_PART)
        print(f"== end-to-end layer: {SERVER_LAYER}, first part, in file order (its 30 slowest steps at the end)",
              flush=True)  # fmt: skip
        first = run_pytest(c, f"-m {SERVER_LAYER} --durations=30{selection} {ignored}")
        stream.join()
    finally:
        with lock:
            stopped = True
            for process in running:
                if process.poll() is None:  # interrupted: the background sessions go too
                    process.terminate()
        stream.join()
    for name, output in outputs.items():
        output.seek(0)
        print(f"== end-to-end layer: {name}, run beside the deploy layer's first part (its output)")
        print(output.read(), end="", flush=True)
        output.close()
    return [first, *(codes.get(name, 1) for name in background)]


def run_pytest(c, args: str) -> int:
    """Run pytest with these arguments; its exit code."""
    return c.run(f"{sys.executable} -m pytest {args}", warn=True, pty=sys.stdout.isatty()).exited


@task
def lint(c):
    """ruff, Django's system checks and the models-match-migrations guard."""
    c.run(f"{sys.executable} -m ruff check .")
    c.run(f"{sys.executable} -m ruff format --check .")
    c.run(f"{MANAGE} check")
    c.run(f"{MANAGE} makemigrations --check --dry-run")


@task
def lock(c):
    """Re-pin, hashed, from pyproject.toml: requirements.lock (what a deploy installs) and requirements-dev.lock
    (the same pins plus the ops and dev extras: what scripts/bootstrap installs).

    Universal locks keep environment markers, so they also install on Debian 12's Python 3.11.2, which needs
    packages a newer Python does not (redis-py's async-timeout before 3.11.3). The dev lock is constrained to the
    runtime one, so the tests run the versions a deploy installs.
    """
    compile_lock = f"{sys.executable} -m uv pip compile pyproject.toml --universal --python-version 3.11"
    c.run(f"{compile_lock} --generate-hashes --quiet -o requirements.lock")
    c.run(f"{compile_lock} --generate-hashes --quiet --extra dev -c requirements.lock -o requirements-dev.lock")


@task
def bench(c, only="", quick=False):
    """Benchmark the stack against plain gunicorn and Celery (--only web,worker; --quick); see bench/results/."""
    from bench.suite import main

    code = main([name for name in only.split(",") if name], quick=quick)
    if code:
        raise Exit(code=code)


# The commands' output (pytest's, manage.py's) decoded whole characters, not each read on its own.
ns = Collection.from_module(sys.modules[__name__], config={"runners": {"local": LocalRunner}})
