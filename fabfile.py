"""`fab` tasks: each builds the site (the environment's hosts, or the one -H names; --role narrows), calls one
function of deploy/actions.py, and turns a DeployError into one line and exit 1.

fab -H root@203.0.113.7 -i ~/.ssh/id_ed25519 deploy        # no config needed: a site of that one host
fab deploy --env production                                 # hosts and settings from deploy.toml
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from fabric import Connection, task
from fabric.tasks import Task as FabricTask
from invoke import Argument, Exit

from deploy import actions, archive, hostkeys, release_upgrade, terminal
from deploy import os_update as os_update_module
from deploy.config import load_config, single_host_site
from deploy.errors import DeployError
from deploy.site import Site

REPO = Path(__file__).resolve().parent
CONNECT_TIMEOUT = 15

# The health checks probe ports that are expected to be closed for a moment; paramiko would print each refusal.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

COMMON_HELP = {
    "env": "a named environment of the deploy config (hosts, user, paths, process counts)",
    "config": "the deploy config file (default: deploy.toml next to this fabfile)",
}
ROLE_HELP = "only the hosts and programs of this role (web, worker, beat)"


def _site(c, env: str | None, config: str | None, role: str | None = None) -> Site:
    """The site to act on: the checked config's hosts (all of them, in the order its roles name them), or the one
    -H names (on a site of one host, or without --env, -H makes that host the site); narrowed to `role`."""
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
    return Site(cfg, conns, role)


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
    site = _site(c, env, config)
    if not site.config.domain:
        print(
            "WARNING: no domain in the deploy config: the site is plain HTTP, so admin logins and session cookies "
            "travel in clear unless TLS ends in front of it (set domain for HTTPS)."
        )
    if dry_run:
        print(actions.plan(site, Path(repo or REPO)))
        return
    actions.deploy(site, Path(repo or REPO), allow_dirty=allow_dirty, maintenance=maintenance)


@task(help={**COMMON_HELP, "repo": "the git checkout to ship (default: this one)"})
@_one_line_errors
def plan(c, env=None, config=None, repo=None):
    """What `fab deploy` would change, including the supervisord config diff; touches nothing."""
    print(actions.plan(_site(c, env, config), Path(repo or REPO)))


@task(help={**COMMON_HELP, "to": "a release id (default: the previous verified release)",
            "unapply": "first migrate back, with the newer release's code, the migrations the target lacks",
            "restore": "put this backup back (the one taken before the deploy): writes since then are LOST",
            "keep_schema": "switch even though the database has migrations the target lacks"})  # fmt: skip
@_one_line_errors
def rollback(c, env=None, config=None, to=None, unapply=False, restore=None, keep_schema=False):
    """Back to the previous release, restarted and verified; refused when the database has migrations it lacks.

    Then choose: --unapply, --restore BACKUP or --keep-schema.
    """
    site = _site(c, env, config)
    actions.rollback(site, to=to, unapply=unapply, restore=restore, keep_schema=keep_schema)


@task(help={**COMMON_HELP, "download": "also copy it to this file or directory (sha256 checked)",
            "verify": "instead, test the archive: its newest backup and WAL restored into a scratch PostgreSQL, "
            "checked against the live release and the live row counts, removed"})  # fmt: skip
@_one_line_errors
def backup(c, env=None, config=None, download=None, verify=False):
    """Back up the database now (pg_dump custom format, root-only on the server, checksummed); --verify tests the
    archive's restore instead."""
    if verify:
        if download:
            raise DeployError("--verify takes no --download: it tests the archive and keeps nothing.")
        print(actions.verify_archive(_site(c, env, config)))
        return
    print(actions.backup_now(_site(c, env, config), download=Path(download) if download else None))


@task(help=COMMON_HELP)
@_one_line_errors
def backups(c, env=None, config=None):
    """The backups on the server: name, kind, release, size, age; and the archive's (type, time, size, WAL range)."""
    print(actions.list_backups(_site(c, env, config)))


class _NameUnlessArchive(Argument):
    """`fab restore`'s NAME: positional, and required unless --to-time or --latest chooses the archive instead."""

    def __init__(self, others: list[Argument], **kwargs) -> None:
        super().__init__(**kwargs)
        self.others = others

    @property
    def value(self):
        # NOTE: invoke requires (and eats a word for) every positional argument whose value is None.
        if self._value is None and any(other.raw_value for other in self.others):
            return ""
        return super().value

    @value.setter
    def value(self, arg) -> None:
        self.set_value(arg, cast=True)


class _RestoreTask(FabricTask):
    def get_arguments(self, ignore_unknown_help=None):
        arguments = super().get_arguments(ignore_unknown_help)
        others = [a for a in arguments if a.name in ("to_time", "latest")]
        return [
            _NameUnlessArchive(others, names=a.names, kind=a.kind, default=a.default, help=a.help, positional=True)
            if a.name == "name"
            else a
            for a in arguments
        ]


@task(klass=_RestoreTask, positional=["name"], help={**COMMON_HELP, "name": "the backup (`fab backups`)",
            "to_time": 'the archive as it was then: "YYYY-MM-DD HH:MM:SS[+TZ]" (UTC without +TZ)',
            "latest": "the archive's newest data (every archived transaction)",
            "yes": "yes, replace the database (every write since the backup or that time is lost)"})  # fmt: skip
@_one_line_errors
def restore(c, name=None, to_time=None, latest=False, yes=False, env=None, config=None):
    """Put a backup back, or the archive's data (--to-time / --latest): the current state is backed up first;
    maintenance page, programs stopped, restart, verify."""
    if sum((bool(name), bool(to_time), bool(latest))) != 1:
        raise DeployError(
            'restore takes one of: a backup NAME (`fab backups`), --to-time "YYYY-MM-DD HH:MM:SS[+TZ]" or --latest.'
        )
    site = _site(c, env, config)
    if name:
        print(actions.restore(site, name, yes=yes))
    else:
        print(actions.restore_archive(site, archive.parse_target_time(to_time) if to_time else None, yes=yes))


@task(help={**COMMON_HELP, "role": ROLE_HELP})
@_one_line_errors
def status(c, env=None, config=None, role=None):
    """One table of each host's programs and live release; the lock, certificate, backups, releases and schedules."""
    with terminal.inert_stdout():  # database text (schedule names) printed inert
        print(actions.status(_site(c, env, config, role)))


# NOTE: invoke's positional arguments are required, so PROGRAM is a flag: `fab logs` shows all of them.
@task(help={**COMMON_HELP, "program": "web, web-1, web-2, worker or beat (default: all)",
            "lines": "how many lines", "follow": "keep streaming one host's (Ctrl-C to stop)",
            "role": ROLE_HELP})  # fmt: skip
@_one_line_errors
def logs(c, program=None, lines=100, follow=False, env=None, config=None, role=None):
    """The last lines of each program's log, or of one (--program NAME); on several hosts, each line after its host."""
    with terminal.inert_stdout():  # log lines (streamed too) printed without their escape sequences
        print(actions.logs(_site(c, env, config, role), program, int(lines), follow), end="")


@task(help={**COMMON_HELP, "program": "web, web-1, web-2, worker or beat (default: all)",
            "role": f"{ROLE_HELP}, one host at a time"})  # fmt: skip
@_one_line_errors
def restart(c, program=None, env=None, config=None, role=None):
    """Restart all programs, or one (--program NAME; web: one port at a time, each checked), one host at a time."""
    print(actions.restart(_site(c, env, config, role), program))


@task(positional=["args"], help={**COMMON_HELP, "args": 'the manage.py command line, e.g. "createsuperuser"'})
@_one_line_errors
def manage(c, args=None, env=None, config=None):
    """Run manage.py ARGS on the primary as the app user, in the live release, with the programs' environment."""
    code = actions.manage(_site(c, env, config), args or "")
    if code:
        raise Exit(code=code)


@task(help=COMMON_HELP)
@_one_line_errors
def shell(c, env=None, config=None):
    """Open `manage.py shell` on the primary, with the programs' environment."""
    code = actions.manage(_site(c, env, config), "shell")
    if code:
        raise Exit(code=code)


@task(
    name="env",
    iterable=["set", "unset"],
    help={**COMMON_HELP, "set": "KEY=VALUE to put in the env file (repeatable)",
          "unset": "KEY to remove from the env file (repeatable)"},
)  # fmt: skip
@_one_line_errors
def env_(c, env=None, config=None, set=None, unset=None):  # noqa: A002 - the option is --set
    """List the programs' variables and where each comes from (secrets masked); --set/--unset change the env file
    on every app host and restart the programs as a deploy does (web one at a time), then verify."""
    site = _site(c, env, config)
    if set or unset:
        actions.env_change(site, list(set or []), list(unset or []))
        return
    with terminal.inert_stdout():  # values from the server printed inert
        print(actions.env_list(site))


@task(
    positional=["command"],
    help={**COMMON_HELP, "command": 'the supervisorctl command line, e.g. "tail -f prayer-room:worker"'},
)
@_one_line_errors
def supervisorctl(c, command=None, env=None, config=None):
    """Run supervisorctl on each app host against the app's supervisord."""
    code = actions.supervisorctl(_site(c, env, config), command or "status")
    if code:
        raise Exit(code=code)


@task(help=COMMON_HELP)
@_one_line_errors
def unlock(c, env=None, config=None):
    """Remove the deploy lock left by a command that died; says whose it was."""
    print(actions.unlock(_site(c, env, config)))


@task(help=COMMON_HELP)
@_one_line_errors
def provision(c, env=None, config=None):
    """Prepare fresh Debian 13 or 12 servers for `fab deploy`; a re-run changes nothing and says so.

    Each host gets its roles' share: the db host first, then the others in parallel.
    """
    print(actions.provision(_site(c, env, config)))


@task(positional=["state"], help={**COMMON_HELP, "state": "on or off",
            "message": "with on: one line of text the page shows (e.g. when the site is back)"})  # fmt: skip
@_one_line_errors
def maintenance(c, state=None, message=None, env=None, config=None):
    """The maintenance page (503, Retry-After) on every web host, kept across deploys until `fab maintenance off`."""
    print(actions.maintenance(_site(c, env, config), state or "", message))


@task(help={**COMMON_HELP, "lines": "how many records, the newest last (default 50)"})
@_one_line_errors
def history(c, lines=50, env=None, config=None):
    """Every provision, deploy, rollback, restore, env change, maintenance switch and os-update: when, who, what,
    result, time."""
    try:
        count = int(lines)
    except ValueError:
        raise DeployError(f"--lines takes a number, not {lines!r}.") from None
    with terminal.inert_stdout():  # operator and error text from the server printed inert
        print(actions.show_history(_site(c, env, config), count))


@task(help={**COMMON_HELP, "reboot": "reboot each host even when no update asks for it",
            "boot_timeout": "seconds a host has to answer over SSH again after its reboot (default 600)",
            "release": "upgrade a site of one Debian 12 server to Debian 13 instead: backup, maintenance page, "
            "apt full-upgrade, PostgreSQL's major version (pg_upgradecluster), reboot, provision, verify",
            "yes": "with --release: yes, take the site down for the upgrade (several minutes)"})  # fmt: skip
@_one_line_errors
def os_update(c, env=None, config=None, reboot=False, boot_timeout=None, release=False, yes=False):
    """Upgrade the Debian packages host by host (web hosts one at a time, each drained at the balancer meanwhile; the
    db host last); reboot a host when an update asks for it (or --reboot), behind the maintenance page where no other
    host serves; verify it before the next. --release upgrades a Debian 12 server to Debian 13
    (docs/release-upgrade.md)."""
    if boot_timeout is not None and not str(boot_timeout).isdigit():
        raise DeployError(f"--boot-timeout must be a number of seconds, got {boot_timeout!r}.")
    timeout = int(boot_timeout) if boot_timeout else os_update_module.BOOT_TIMEOUT
    if release:
        if reboot:
            raise DeployError("--release always reboots: leave --reboot out.")
        site = _site(c, env, config)
        print(release_upgrade.release_upgrade(site, yes=yes, confirm=_confirm, boot_timeout=timeout))
        return
    if yes:
        raise DeployError("--yes goes with --release (a plain os-update asks nothing).")
    print(os_update_module.os_update(_site(c, env, config), reboot=reboot, boot_timeout=timeout))


def _confirm(question: str) -> bool:
    """The operator's yes at a terminal; without one (a script, CI), no: the command asks for --yes instead."""
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [yes/no] ").strip().lower() in ("y", "yes")


def _ask(question: str) -> bool:
    """The operator's yes to `question` on a terminal; no terminal is a no."""
    if not sys.stdin.isatty():
        raise DeployError("no terminal to confirm the host key on: pass --fingerprint SHA256:... (from the console).")
    return input(f"{question} [yes/no] ").strip().lower() in ("y", "yes")


@task(help={**COMMON_HELP, "fingerprint": "record a host's key without a prompt when it is this SHA256:... (from the "
            "server's console; several: comma-separated), refuse it otherwise"})  # fmt: skip
@_one_line_errors
def trust(c, env=None, config=None, fingerprint=None):
    """Show each host's SSH key and record it in ~/.ssh/known_hosts once you confirm it (every other task refuses a
    host whose key is not there)."""
    conns = _site(c, env, config).conns
    fingerprints = [part.strip() for part in (fingerprint or "").split(",") if part.strip()]
    for conn in conns:
        print(hostkeys.trust(conn.host, conn.port, conn.user, fingerprints=fingerprints, confirm=_ask,
                             timeout=conn.connect_timeout))  # fmt: skip
