"""Local tasks (`invoke --list`): thin wrappers over the project's manage.py and the deploy library."""

import os
import sys
from pathlib import Path

from invoke import Exit, task

from deploy.errors import DeployError

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


@task
def test(c, k="", unit=False):
    """Run the test suite (-k EXPR to select, --unit for the fast layer only)."""
    args = ["-m 'not integration and not deploy and not browser and not faults'"] if unit else []
    if k:
        args.append(f"-k {k!r}")
    result = c.run(f"{sys.executable} -m pytest {' '.join(args)}", warn=True, pty=sys.stdout.isatty())
    if result.exited:
        raise Exit(code=result.exited)


@task
def lint(c):
    """ruff, Django's system checks and the models-match-migrations guard."""
    c.run(f"{sys.executable} -m ruff check .")
    c.run(f"{sys.executable} -m ruff format --check .")
    c.run(f"{MANAGE} check")
    c.run(f"{MANAGE} makemigrations --check --dry-run")


@task
def lock(c):
    """Re-pin requirements.lock (hashed) from pyproject.toml; the deploy installs exactly this.

    A universal lock keeps environment markers, so it also installs on Debian 12's Python 3.11.2,
    which needs packages a newer Python does not (redis-py's async-timeout before 3.11.3).
    """
    c.run(
        f"{sys.executable} -m uv pip compile pyproject.toml --universal --python-version 3.11 "
        "--generate-hashes --quiet -o requirements.lock"
    )


@task
def bench(c, only="", quick=False):
    """Benchmark the stack against plain gunicorn and Celery (--only web,worker; --quick); see bench/results/."""
    from bench.suite import main

    code = main([name for name in only.split(",") if name], quick=quick)
    if code:
        raise Exit(code=code)
