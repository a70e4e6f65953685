"""What a server holds, read in one round trip: releases, `current`, the env file, the live programs config."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from deploy.config import has_app
from deploy.errors import DeployError
from deploy.on_server.common import read_env_file
from deploy.ssh import Server, sh

DEPLOYED_MARK = ".deployed"
KEEP_SCHEMA_MARK = ".keep-schema"  # the migrations `rollback --keep-schema` let this release run against
VENV_DONE_MARK = ".complete"


@dataclass(frozen=True)
class ServerState:
    """The releases on a server (ids oldest first), which passed verification, which is live, and more."""

    releases: tuple[str, ...]
    deployed: frozenset[str]
    current: str | None
    venvs: dict[str, str]  # release id -> venv directory name
    ready_venvs: frozenset[str]
    root_exists: bool
    supervisord_up: bool
    env_text: str | None
    live_programs: str | None
    beat_log_size: int
    unsafe_dirs: tuple[str, ...] = ()  # layout directories root acts in that are not root's alone
    build_user: bool = True  # the build user (collectstatic's) exists

    def previous(self, before: str | None = None) -> str | None:
        """The newest verified release older than `before` (default: the live one)."""
        before = before or self.current
        older = [r for r in self.releases if r in self.deployed and (before is None or r < before)]
        return older[-1] if older else None

    def env_values(self, server: Server) -> dict[str, str]:
        if self.env_text is None:
            raise DeployError(f"{server.name} has no env file at {server.config.layout.env_file}; run `fab provision`.")
        try:
            return read_env_file(self.env_text)
        except ValueError as exc:
            raise DeployError(f"{server.config.layout.env_file} on {server.name}: {exc}.") from exc

    def require_provisioned(self, server: Server) -> None:
        """Refuse a host deploy cannot act on: one whose roles run no app (`has_app`: deploy skips a db or balancer
        host), or one provision has not prepared for its roles (layout, root-only directories, supervisord)."""
        layout = server.config.layout
        if not has_app(server.config):
            roles = ", ".join(sorted(server.config.host_roles)) or "none"
            raise DeployError(
                f"{server.name} runs no app (its roles: {roles}); deploy skips it: `fab provision` is all it needs."
            )
        if not self.root_exists:
            raise DeployError(f"{server.name} has no {layout.root}; run `fab provision` first.")
        if self.unsafe_dirs:
            raise DeployError(
                f"{', '.join(self.unsafe_dirs)} on {server.name} must be root's and writable by root alone (the app "
                "user could change what root runs or deletes); run `fab provision`, which takes them back."
            )
        if not self.build_user:
            raise DeployError(
                f"{server.name} has no build user {server.config.build_user!r} (collectstatic runs as it, so the "
                "app user cannot write the static files nginx serves); run `fab provision`, which creates it."
            )
        if not self.supervisord_up:
            raise DeployError(
                f"supervisord is not answering on {layout.supervisor_socket} on {server.name}; start the "
                "prayer-room service (systemctl status prayer-room), or run `fab provision`."
            )

    def require_env_editable(self, server: Server) -> None:
        """Refuse a host an env change cannot act on. A host with a live release must be provisioned as deploy needs
        it (its programs restart with the new file); one without needs only provision's env file (nothing restarts:
        its first deploy applies it), which the primary of a site without a db host has as soon as provision stops
        for the service URLs."""
        if self.current or not has_app(server.config) or self.unsafe_dirs:
            self.require_provisioned(server)
        elif not self.root_exists or self.env_text is None:
            raise DeployError(f"{server.name} has no env file at {server.config.layout.env_file}; run `fab provision`.")


def read_state(server: Server) -> ServerState:
    """Everything deploy, rollback and plan decide on, as root, in one command."""
    layout = server.config.layout
    mark = f"@@{secrets.token_hex(8)}@@"
    sections = {
        "root": f"test -d {sh(layout.root)} && echo yes",
        "supervisord": f"{server.supervisorctl_command('pid')} >/dev/null 2>&1 && echo yes",
        "env": f"cat {sh(layout.env_file)} 2>/dev/null",
        "build": f"getent passwd {sh(server.config.build_user)} >/dev/null && echo yes",
        "programs": f"cat {sh(layout.programs_conf)} 2>/dev/null",
        "beatlog": f"stat -c %s {sh(layout.logs / 'beat.log')} 2>/dev/null",
        "current": f"readlink {sh(layout.current)}",
        "owners": f"stat -c '%n %u %a' {sh(layout.root, layout.releases, layout.venvs)} 2>/dev/null",
        # A virtualenv is reused only if complete and root's to the last file (the app user cannot have touched it).
        "venvs": (
            f'for v in {sh(layout.venvs)}/*; do [ -e "$v/{VENV_DONE_MARK}" ] && '
            '[ -z "$(find "$v" ! -user root -print -quit)" ] && echo "${v##*/}"; done'
        ),
        "releases": (
            f'cd {sh(layout.releases)} 2>/dev/null && for d in */; do d=${{d%/}}; [ -d "$d" ] || continue; '
            f'echo "$d $( [ -e "$d/{DEPLOYED_MARK}" ] && echo yes || echo no ) $(readlink "$d/.venv")"; done'
        ),
    }
    script = "; ".join(f"echo {sh(mark + name)}; ( {command} )" for name, command in sections.items())
    out = server.root(script + "; true", what="reading the server's state").stdout
    parts: dict[str, str] = {}
    for chunk in out.split(mark)[1:]:
        name, _, body = chunk.partition("\n")
        parts[name] = body
    releases, deployed, venvs = [], set(), {}
    for line in parts.get("releases", "").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            releases.append(fields[0])
            if fields[1] == "yes":
                deployed.add(fields[0])
            if len(fields) > 2:
                venvs[fields[0]] = fields[2].rstrip("/").rsplit("/", 1)[-1]
    current = parts.get("current", "").strip().rstrip("/").rsplit("/", 1)[-1] or None
    size = parts.get("beatlog", "").strip()
    unsafe = [
        words[0]
        for words in map(str.split, parts.get("owners", "").splitlines())
        if len(words) == 3 and (words[1] != "0" or int(words[2][-2:], 8) & 0o22)
    ]
    return ServerState(
        releases=tuple(sorted(releases)),
        deployed=frozenset(deployed),
        current=current,
        venvs=venvs,
        ready_venvs=frozenset(parts.get("venvs", "").split()),
        root_exists=parts.get("root", "").strip() == "yes",
        supervisord_up=parts.get("supervisord", "").strip() == "yes",
        env_text=parts["env"] if parts.get("env") else None,
        live_programs=parts["programs"] if parts.get("programs") else None,
        beat_log_size=int(size) if size.isdigit() else 0,
        unsafe_dirs=tuple(unsafe),
        build_user=parts.get("build", "").strip() == "yes",
    )
