"""`fab` tasks for a VPS: thin wrappers over deploy/workflow.py. A DeployError becomes one line and exit 1.

fab -H root@203.0.113.7 -i ~/.ssh/id_ed25519 deploy        # no config needed
fab deploy --env production                                 # hosts and settings from deploy.toml
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fabric import Connection, task
from invoke import Exit

from deploy import cluster, workflow
from deploy import provision as provisioning
from deploy.config import DeployConfig, address_of, has_app, load_config, single_host_site
from deploy.errors import DeployError

REPO = Path(__file__).resolve().parent
CONNECT_TIMEOUT = 15

# The health checks probe ports that are expected to be closed for a moment; paramiko would print each refusal.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

COMMON_HELP = {
    "env": "a named environment of the deploy config (hosts, user, paths, process counts)",
    "config": "the deploy config file (default: deploy.toml next to this fabfile)",
}


def _targets(c, env: str | None, config: str | None) -> tuple[DeployConfig, list[Connection]]:
    """The checked config and the hosts to act on: -H wins, else the site's hosts (all of them, in the order its
    roles name them; `cfg.at(conn.host)` is each one's config). -H on a site of one host (or without --env) makes
    that host the site."""
    cfg = load_config(Path(config) if config else None, env)
    if isinstance(c, Connection):
        if cfg.multi_host:
            cfg.at(c.host)  # on a site of several hosts, -H must be one of them
        else:
            cfg = single_host_site(cfg, c.original_host)
        conns = [c]
    elif cfg.site_hosts:
        conns = [Connection(host, config=c.config) for host in cfg.site_hosts]
    else:
        raise DeployError("no host: pass -H user@host, or --env NAME for an environment with hosts in deploy.toml.")
    for conn in conns:
        if conn.connect_timeout is None:
            conn.connect_timeout = CONNECT_TIMEOUT
    return cfg, conns


def _primary(c, env: str | None, config: str | None) -> tuple[DeployConfig, list[Connection]]:
    """`_targets`, narrowed on a cluster to its primary (the first web host: it keeps the backups)."""
    cfg, conns = _targets(c, env, config)
    if not cfg.multi_host:
        return cfg, conns
    chosen = [conn for conn in conns if conn.host == address_of(cfg.primary)]
    if not chosen:
        raise DeployError(
            f"the backups of {cfg.name} are on its primary, {cfg.primary}: use -H with it, or leave -H out."
        )
    return cfg.for_host(cfg.primary), chosen


def _as_cluster(c, cfg: DeployConfig, what: str) -> bool:
    """Whether to act on the whole cluster (an environment with roles, no -H); `what` cannot take -H on one."""
    if not cfg.multi_host:
        return False
    if isinstance(c, Connection):
        if what:
            raise DeployError(f"{what} acts on every host of the cluster {cfg.name} at once: leave -H out.")
        return False
    return True


def _one_line_errors(body):
    """Turn DeployError (and Ctrl-C) into invoke.Exit: a clear message, a non-zero exit, no traceback."""

    @functools.wraps(body)
    def wrapper(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except DeployError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise Exit(f"error: {' | '.join(lines)}", code=1) from None
        except KeyboardInterrupt:
            raise Exit("interrupted (the deploy lock was released; `fab unlock` if it was not).", code=130) from None

    return wrapper


@task(help={**COMMON_HELP, "dry_run": "print the plan (config diff included) and change nothing",
            "allow_dirty": "ship HEAD even though the work tree has uncommitted changes (they stay behind)",
            "maintenance": "run migrations the live release cannot live with in a short 503 window",
            "repo": "the git checkout to ship (default: this one)"})  # fmt: skip
@_one_line_errors
def deploy(c, env=None, config=None, dry_run=False, allow_dirty=False, maintenance=False, repo=None):
    """Ship HEAD, check and back up, migrate, switch, restart (web one port at a time), verify; roll back on failure."""
    cfg, conns = _targets(c, env, config)
    if dry_run:
        return plan(c, env=env, config=config, repo=repo)
    if _as_cluster(c, cfg, "deploy"):
        cluster.deploy(conns, cfg, Path(repo or REPO), allow_dirty=allow_dirty, maintenance=maintenance)
        return
    for conn in conns:
        workflow.deploy(conn, cfg, Path(repo or REPO), allow_dirty=allow_dirty, maintenance=maintenance)


@task(help={**COMMON_HELP, "repo": "the git checkout to ship (default: this one)"})
@_one_line_errors
def plan(c, env=None, config=None, repo=None):
    """What `fab deploy` would change, including the supervisord config diff; touches nothing."""
    cfg, conns = _targets(c, env, config)
    for conn in conns:
        if has_app(cfg.at(conn.host)):
            print(workflow.plan(conn, cfg.at(conn.host), Path(repo or REPO)))


@task(help={**COMMON_HELP, "to": "a release id (default: the previous verified release)",
            "unapply": "first migrate back, with the newer release's code, the migrations the target lacks",
            "restore": "put this backup back (the one taken before the deploy): writes since then are LOST",
            "keep_schema": "switch even though the database has migrations the target lacks"})  # fmt: skip
@_one_line_errors
def rollback(c, env=None, config=None, to=None, unapply=False, restore=None, keep_schema=False):
    """Back to the previous release, restarted and verified; refused when the database has migrations it lacks.

    Then choose: --unapply, --restore BACKUP or --keep-schema.
    """
    cfg, conns = _targets(c, env, config)
    if _as_cluster(c, cfg, "rollback"):
        cluster.rollback(conns, cfg, to=to, unapply=unapply, restore=restore, keep_schema=keep_schema)
        return
    for conn in conns:
        workflow.rollback(conn, cfg, to=to, unapply=unapply, restore=restore, keep_schema=keep_schema)


@task(help={**COMMON_HELP, "download": "also copy it to this file or directory (sha256 checked)"})
@_one_line_errors
def backup(c, env=None, config=None, download=None):
    """Back up the database now (pg_dump custom format, root-only on the server, checksummed)."""
    cfg, conns = _primary(c, env, config)
    for conn in conns:
        print(workflow.backup_now(conn, cfg, download=Path(download) if download else None))


@task(help=COMMON_HELP)
@_one_line_errors
def backups(c, env=None, config=None):
    """The backups on the server: name, kind, release, size, age."""
    cfg, conns = _primary(c, env, config)
    for conn in conns:
        print(workflow.list_backups(conn, cfg))


@task(positional=["name"], help={**COMMON_HELP, "name": "the backup (`fab backups`)",
            "yes": "yes, replace the database (every write since the backup is lost)"})  # fmt: skip
@_one_line_errors
def restore(c, name, env=None, config=None, yes=False):
    """Put a backup back: the current state is backed up first; maintenance page, programs stopped, restart, verify."""
    cfg, conns = _targets(c, env, config)
    if _as_cluster(c, cfg, "restore"):
        print(cluster.restore(conns, cfg, name, yes=yes))
        return
    for conn in conns:
        print(workflow.restore(conn, cfg, name, yes=yes))


@task(help={**COMMON_HELP, "role": "on a cluster: only the hosts and programs of this role (web, worker, beat)"})
@_one_line_errors
def status(c, env=None, config=None, role=None):
    """Each program's state, the live release, the kept releases and the schedules beat runs (a cluster: one table)."""
    cfg, conns = _targets(c, env, config)
    if _as_cluster(c, cfg, ""):
        print(cluster.status(conns, cfg, role))
        return
    for conn in conns:
        print(workflow.status(conn, cfg.at(conn.host)))


# NOTE: invoke's positional arguments are required, so PROGRAM is a flag: `fab logs` shows all of them.
@task(help={**COMMON_HELP, "program": "web, web-1, web-2, worker or beat (default: all)",
            "lines": "how many lines", "follow": "keep streaming (Ctrl-C to stop)",
            "role": "on a cluster: the hosts of this role (web, worker, beat)"})  # fmt: skip
@_one_line_errors
def logs(c, program=None, lines=100, follow=False, env=None, config=None, role=None):
    """The last lines of each program's log, or of one (--program NAME); a cluster's, each line after its host."""
    cfg, conns = _targets(c, env, config)
    if _as_cluster(c, cfg, ""):
        if follow:
            raise DeployError("--follow streams one host's logs: add -H user@host (one of the cluster's).")
        print(cluster.logs(conns, cfg, program, int(lines), role), end="")
        return
    for conn in conns:
        print(workflow.logs(conn, cfg.at(conn.host), program, int(lines), follow), end="")


@task(help={**COMMON_HELP, "program": "web, web-1, web-2, worker or beat (default: all)",
            "role": "on a cluster: the hosts of this role (web, worker, beat), one at a time"})  # fmt: skip
@_one_line_errors
def restart(c, program=None, env=None, config=None, role=None):
    """Restart all programs, or one (--program NAME; web: one port at a time, each checked); a cluster: host by host."""
    cfg, conns = _targets(c, env, config)
    if _as_cluster(c, cfg, ""):
        print(cluster.restart(conns, cfg, program, role))
        return
    for conn in conns:
        print(workflow.restart_programs(conn, cfg.at(conn.host), program))


@task(
    positional=["command"],
    help={**COMMON_HELP, "command": 'the supervisorctl command line, e.g. "tail -f prayer-room:worker"'},
)
@_one_line_errors
def supervisorctl(c, command=None, env=None, config=None):
    """Run supervisorctl on the server against the app's supervisord."""
    cfg, conns = _targets(c, env, config)
    code = 0
    for conn in conns:
        if has_app(cfg.at(conn.host)):
            if cfg.multi_host:
                print(f"== {conn.host}", flush=True)
            code = workflow.supervisorctl(conn, cfg.at(conn.host), command or "status") or code
    if code:
        raise Exit(code=code)


@task(help=COMMON_HELP)
@_one_line_errors
def unlock(c, env=None, config=None):
    """Remove the deploy lock left by a deploy that died; says whose it was."""
    cfg, conns = _targets(c, env, config)
    if _as_cluster(c, cfg, ""):
        print(cluster.unlock(conns, cfg))
        return
    for conn in conns:
        print(workflow.unlock(conn, cfg.at(conn.host)))


@task(help=COMMON_HELP)
@_one_line_errors
def provision(c, env=None, config=None):
    """Prepare fresh Debian 12 / Ubuntu 24.04 servers for `fab deploy`; a re-run changes nothing and says so.

    Each host gets its roles' share: the db host first, then the others in parallel.
    """
    cfg, conns = _targets(c, env, config)
    print(provisioning.provision(conns, cfg))
