"""Local tasks (`invoke --list`): thin wrappers over the project's manage.py and the deploy library."""

import os
import sys
from pathlib import Path

from invoke import Exit, task

from deploy.errors import DeployError

REPO = Path(__file__).resolve().parent
MANAGE = f"{sys.executable} {REPO / 'project' / 'manage.py'}"


@task
def dev(c, port=8000):
    """Migrate, seed the schedules, then run web + worker + beat under supervisord until Ctrl-C."""
    from deploy import local

    os.environ["VAR_DIR"] = str(local.var_dir())
    migrate(c)
    seed(c)
    try:
        config = local.write_dev_config(port)
        print(
            f"web on http://127.0.0.1:{port}/ (admin at /admin/); logs in {local.var_dir() / 'log'}; Ctrl-C stops all"
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
