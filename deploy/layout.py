"""Where everything lives on a server; provision creates it, deploy fills it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

# Loopback ports of the web programs (web-1, web-2, ...). nginx's upstream lists all of them with
# proxy_next_upstream, and a deploy restarts them one at a time, so nginx never meets a closed port.
WEB_PORTS: tuple[int, ...] = (8001, 8002)

# The supervisord group holding web-N, worker and beat (supervisorctl names: prayer-room:web-1, ...).
SUPERVISOR_GROUP = "prayer-room"


@dataclass(frozen=True)
class ServerLayout:
    """Paths under the app directory (default /srv/prayer-room), all owned by root and read-only to the app user
    unless noted: code execution as the app user can change neither the code, nor its virtualenv, nor what
    root runs next (see docs/security.md)."""

    root: PurePosixPath = PurePosixPath("/srv/prayer-room")
    # Root-owned configuration; tests point both at a temporary directory.
    etc: PurePosixPath = PurePosixPath("/etc/prayer-room")
    # Database backups (pg_dump -Fc + a .json record each): root-only (0700), outside the app's tree.
    backups: PurePosixPath = PurePosixPath("/var/backups/prayer-room")
    # supervisord's socket and pid file: the unit's RuntimeDirectory, root-only (0700).
    run: PurePosixPath = PurePosixPath("/run/prayer-room")
    # Root's commands: prayer-room-manage (manage.py as the programs run it).
    sbin: PurePosixPath = PurePosixPath("/usr/local/sbin")

    @property
    def manage_command(self) -> PurePosixPath:
        """Root's `prayer-room-manage ARGS`: manage.py ARGS in the live release, as the app user, with the programs'
        environment; installed by each deploy (root's, 0755)."""
        return self.sbin / "prayer-room-manage"

    @property
    def releases(self) -> PurePosixPath:
        """One directory per deploy: releases/<YYYYmmddHHMMSS>-<sha12>/ with the project and a REVISION file."""
        return self.root / "releases"

    @property
    def current(self) -> PurePosixPath:
        """Symlink to the live release, switched atomically (ln -sfn + mv -T)."""
        return self.root / "current"

    @property
    def venvs(self) -> PurePosixPath:
        """Virtualenvs keyed by the sha256 of requirements.lock, built by the build user from wheels, then root's;
        a release links its own as .venv.

        A deploy reuses one only if every file in it is still root's (the app user cannot have modified it) and its
        Python still starts.
        """
        return self.root / "venvs"

    @property
    def env_file(self) -> PurePosixPath:
        """KEY=value lines (SECRET_KEY, DATABASE_URL, ...), root:<app user> 0640, written by provision, never printed.

        One KEY=value per line; blank lines and `#` lines ignored; the value is the rest of the line
        (one pair of surrounding quotes is stripped). deploy merges these into `effective_env`.
        """
        return self.root / "shared" / "env"

    @property
    def previous_env_file(self) -> PurePosixPath:
        """The env file an env change replaced (`fab env --set/--unset`), root:<app user> 0640, kept beside it."""
        return self.root / "shared" / "env.previous"

    @property
    def effective_env(self) -> PurePosixPath:
        """The programs' whole environment (env file, deploy.toml's env, derived values), root:<app user> 0640,
        written by each deploy and env change; the settings of every program and of prayer-room-manage read it."""
        return self.root / "shared" / "env.effective"

    @property
    def previous(self) -> PurePosixPath:
        """Symlink to the release live before `current` (set at each switch): nginx serves its static files
        after current's, for the programs that still run it during a rolling restart."""
        return self.root / "previous"

    def static(self, release_id: str) -> PurePosixPath:
        """A release's collectstatic target (content-hashed names and staticfiles.json), served by nginx.

        The build user's while the deploy's collectstatic runs (the app user can never write it); root's from then on.
        """
        return self.releases / release_id / "static"

    @property
    def logs(self) -> PurePosixPath:
        """The programs' logs, written by root's supervisord; root-only (0750), so the app user can neither read
        nor replace a file there (supervisord as root opens each log following symlinks)."""
        return self.root / "log"

    @property
    def supervisor_socket(self) -> PurePosixPath:
        return self.run / "supervisor.sock"

    @property
    def supervisor_conf(self) -> PurePosixPath:
        """supervisord's main config, owned by root, unwritable by the app user."""
        return self.etc / "supervisord.conf"

    @property
    def programs_conf(self) -> PurePosixPath:
        """The rendered supervisord.conf.j2 programs, included by supervisor_conf; replaced each deploy.

        Root-owned, mode 0600; the programs' values come from `effective_env` (releases before it had them here).
        """
        return self.etc / "programs.conf"

    @property
    def programs_history(self) -> PurePosixPath:
        """<release id>.conf: the programs.conf each release was deployed with (root, 0600), for rollback."""
        return self.etc / "releases"

    @property
    def maintenance_flag(self) -> PurePosixPath:
        """The kit's own maintenance window (deploy --maintenance, restore): while this file exists nginx answers 503
        with a small page (deploy.maintenance.window creates and removes it)."""
        return self.root / "maintenance-on"

    @property
    def maintenance_page(self) -> PurePosixPath:
        """The operator's maintenance page (`fab maintenance on`, with its message; root's, 0644): while it exists
        nginx answers 503 with it. Only `fab maintenance off` removes it, so it outlasts deploys and their windows."""
        return self.root / "maintenance.html"

    @property
    def maintenance_record(self) -> PurePosixPath:
        """Who turned the operator's maintenance page on, when, with which message (JSON, root's, 0600)."""
        return self.root / "maintenance.json"

    @property
    def history(self) -> PurePosixPath:
        """What was done to the site (provision, deploy, rollback, restore, env, maintenance), one JSON line each,
        appended by root on the primary (root:root 0600, in the root-only log directory)."""
        return self.logs / "history.jsonl"

    @property
    def lock(self) -> PurePosixPath:
        """The deploy lock directory (mkdir is atomic); holds who and since when."""
        return self.root / "deploy.lock"
