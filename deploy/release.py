"""Releases: what is shipped (committed HEAD), and the server's releases/, venvs/ and `current`."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from deploy import environment
from deploy.app import REDIS_KEY_PREFIX
from deploy.commands import release as release_commands
from deploy.commands import sh
from deploy.errors import DeployError
from deploy.ssh import Server
from deploy.state import DEPLOYED_MARK, KEEP_SCHEMA_MARK, VENV_DONE_MARK, ServerState


@dataclass(frozen=True)
class Source:
    """The commit to ship from a local git work tree."""

    repo: Path
    sha: str
    dirty: tuple[str, ...]

    @property
    def short(self) -> str:
        return self.sha[:12]

    def release_id(self, now: float | None = None) -> str:
        return f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}-{self.short}"

    def file(self, path: str) -> bytes:
        return _git(self.repo, "show", f"{self.sha}:{path}")

    @property
    def lock_hash(self) -> str:
        """sha256 of the committed requirements.lock: the key of the virtualenv."""
        return hashlib.sha256(self.file("requirements.lock")).hexdigest()[:16]

    def archive(self, release_id: str) -> bytes:
        """The committed tree as a tar, plus REVISION naming the release."""
        tree = _git(self.repo, "archive", "--format=tar", self.sha)
        out = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(tree)) as source, tarfile.open(fileobj=out, mode="w") as target:
            for member in source.getmembers():
                target.addfile(member, source.extractfile(member) if member.isfile() else None)
            revision = f"{release_id}\n".encode()
            info = tarfile.TarInfo("REVISION")
            info.size, info.mode, info.mtime = len(revision), 0o644, int(time.time())
            target.addfile(info, io.BytesIO(revision))
        return out.getvalue()

    def migrations(self) -> set[str]:
        """The migration files of the commit, relative to the release root."""
        names = _git(self.repo, "ls-tree", "-r", "--name-only", self.sha, "project").decode().split()
        return {n for n in names if "/migrations/" in n and n.endswith(".py") and not n.endswith("__init__.py")}

    def commits_since(self, release_id: str | None) -> list[str]:
        """One line per commit between a release (its id ends with its sha12) and this one, if known here."""
        if not release_id:
            return []
        try:
            return (
                _git(self.repo, "log", "--oneline", f"{release_id.rsplit('-', 1)[-1]}..{self.sha}")
                .decode()
                .splitlines()
            )
        except DeployError:
            return ["(the live release's commit is not in this repository)"]


def _git(repo: Path, *args: str) -> bytes:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True).stdout
    except FileNotFoundError as exc:
        raise DeployError("git is not installed here; deploy ships a git commit.") from exc
    except subprocess.CalledProcessError as exc:
        raise DeployError(f"git {' '.join(args)} failed in {repo}: {exc.stderr.decode().strip()}") from exc


def local_source(repo: Path) -> Source:
    """HEAD of `repo` and the files that differ from it (untracked ones included)."""
    if not (repo / ".git").exists():
        raise DeployError(f"{repo} is not a git checkout; deploy ships its committed HEAD.")
    sha = _git(repo, "rev-parse", "--verify", "HEAD").decode().strip()
    status = _git(repo, "status", "--porcelain", "--untracked-files=normal").decode()
    dirty = tuple(line[3:] for line in status.splitlines() if line.strip())
    return Source(repo=repo, sha=sha, dirty=dirty)


def live_migrations(server: Server) -> set[str]:
    """The migration files of the live release."""
    current = server.config.layout.current
    out = server.root(
        f"cd {sh(current)} 2>/dev/null && find project -path '*/migrations/*.py' ! -name __init__.py",
        what="listing the live migrations",
        warn=True,
    ).stdout
    return set(out.split())


def redis_prefixed(output: str) -> bool:
    """The answer of deploy.commands.release.redis_prefix_check: True when the release names its Redis keys under
    the app's prefix."""
    answer = output.strip()
    if answer not in ("prefixed", "unprefixed"):
        raise DeployError(f"checking a release's Redis key prefix gave an unexpected answer: {answer[-300:]!r}")
    return answer == "prefixed"


def uses_redis_prefix(server: Server, release_id: str) -> bool:
    """Whether `release_id`'s code (its settings file, read by grep as root; none of its code runs) names every Redis
    key under the app's prefix, the only keys the app's Redis ACL user may touch."""
    check = release_commands.redis_prefix_check(server.config.layout.releases / release_id)
    return redis_prefixed(server.root(check, what=f"checking {release_id}'s Redis key prefix").stdout)


def refuse_unprefixed(target: str) -> str:
    """Why a rollback to `target`, a release from before the Redis key prefix, is refused, and what to do instead."""
    return (
        f"refusing to roll back to {target}: its code predates the Redis key prefix {REDIS_KEY_PREFIX} (its settings "
        f"do not define REDIS_KEY_PREFIX), and the app's Redis login may touch only keys under it, so its web, worker "
        f"and beat would be refused by Redis (NOPERM); nothing was changed. Instead `fab rollback --to` a newer "
        "release (`fab status` lists them), or `fab deploy` a commit with the prefix (e.g. a revert of the change "
        "you want undone)."
    )


def history_path(server: Server, release_id: str):
    """Where the programs config a release was deployed with is kept (root-only: it holds the env values)."""
    return server.config.layout.programs_history / f"{release_id}.conf"


def upload_release(server: Server, source: Source, release_id: str, programs_text: str) -> None:
    """Unpack the commit into releases/<id> (root's, read-only to the app user), link its venv, keep its programs
    config; write the programs' effective environment and prayer-room-manage (deploy.environment)."""
    layout = server.config.layout
    tarball = layout.releases / f".{release_id}.tar"
    venv = layout.venvs / source.lock_hash
    # collectstatic (as the build user: the app user cannot write it) fills static/; seal_static makes it root's.
    unpack = release_commands.unpack(layout, release_id, tarball, venv, server.config.build_user)
    env_files, place_env = environment.program_files(server)
    server.upload(
        [
            (source.archive(release_id), tarball, "root", "0600"),
            (programs_text, history_path(server, release_id), "root", "0600"),
            *env_files,
        ],
        then=f"{unpack} && {place_env}",
        what="uploading the release",
    )


def seal_static(server: Server, release_id: str) -> None:
    """The release's collected static files become root's: read-only to the build user too from here on."""
    static = server.config.layout.static(release_id)
    server.root(sh("chown", "-R", "-h", "root:root", static), what="making the static files root's")


def build_venv(server: Server, lock: PurePosixPath, lock_hash: str) -> None:
    """Build venvs/<lock hash> as the build user from `lock` (a release's requirements.lock; binary wheels only,
    hash-checked), `pip check` it as the build user, then hand it to root.

    Root never runs the venv's Python nor a package's build: a dependency's .pth file or build script runs, if at
    all, as the build user, which can then change nothing root took over. Root's, read-only to the app user after:
    the programs cannot plant code (a .pth file) that later deploys reuse. A half-built venv (no completion mark,
    or not root's to the last file) is rebuilt from scratch.
    """
    layout, config = server.config.layout, server.config
    venv = layout.venvs / lock_hash
    server.root(release_commands.venv_directory(venv, config.build_user), what="making the virtualenv directory")
    build = server.root(
        server.as_build(release_commands.build_venv(config, venv, lock)),
        what=f"building the virtualenv from requirements.lock with {config.python}",
        warn=True,
        timeout=1800,
    )
    if build.exited != 0:
        said = (build.stderr.strip() or build.stdout.strip())[-1500:]
        missing = re.findall(r"No matching distribution found for (\S+)", said)
        if missing:
            raise DeployError(
                f"requirements.lock's {', '.join(missing)} has no binary wheel for {config.python} on "
                f"{server.name} (the kit installs wheels only: no package code runs while building): pin a "
                "version that ships a wheel for this Python (`invoke lock`), or use a server Python it has one for."
            )
        raise DeployError(
            f"building the virtualenv from requirements.lock with {config.python} failed on {server.name} "
            f"(exit {build.exited}): {said}"
        )
    check = server.root(server.as_build(release_commands.check_venv(venv)), what="checking the virtualenv", warn=True)
    if check.exited != 0:
        raise DeployError(
            f"requirements.lock is incomplete for {config.python} on {server.name}: {check.stdout.strip()} -- "
            "add the missing package to pyproject.toml and re-lock (`invoke lock`)."
        )
    server.root(
        release_commands.hand_over_venv(venv, config.build_user, VENV_DONE_MARK),
        what="making the virtualenv root's",
    )


def venv_runs(server: Server, lock_hash: str) -> bool:
    """Whether a ready venv's Python still starts (as the build user): an OS upgrade removes its Python."""
    venv = server.config.layout.venvs / lock_hash
    run = server.root(
        server.as_build(release_commands.venv_runs(venv)), what="starting the virtualenv's Python", warn=True
    )
    return run.exited == 0


def switch_command(server: Server, release_id: str) -> str:
    """deploy.commands.release.switch for this server's layout."""
    return release_commands.switch(server.config.layout, release_id)


def unmark(server: Server, release_id: str) -> None:
    """Take a release's verified mark away: rollbacks no longer return to it (a new deploy of it can)."""
    mark = server.config.layout.releases / release_id / DEPLOYED_MARK
    server.root(sh("rm", "-f", mark), what="unmarking the release rolled back from")


def accept_schema(server: Server, release_id: str, migrations: tuple[str, ...]) -> None:
    """Record that the operator let `release_id` run against `migrations`, which it lacks (`rollback --keep-schema`):
    a restore of data with them lets it serve that data too."""
    mark = server.config.layout.releases / release_id / KEEP_SCHEMA_MARK
    server.upload([("".join(f"{m}\n" for m in migrations), mark, "root", "0644")], what="recording --keep-schema")


def accepted_schema(server: Server, release_id: str) -> set[str]:
    """The migrations `accept_schema` recorded for `release_id`."""
    mark = server.config.layout.releases / release_id / KEEP_SCHEMA_MARK
    return set((server.read(mark, what="reading the --keep-schema record") or "").split())


def remove_release(server: Server, release_id: str) -> None:
    server.root(
        sh("rm", "-rf", server.config.layout.releases / release_id, history_path(server, release_id)),
        what="removing a failed release",
    )


def finish(server: Server, state: ServerState, release_id: str, venv: str) -> list[str]:
    """Mark `release_id` verified, keep the newest keep_releases releases (always the live one and the one live
    before it, whose static files nginx still serves), drop unused venvs."""
    layout = server.config.layout
    releases = sorted({*state.releases, release_id})
    keep = set(releases[-server.config.keep_releases :]) | {release_id} | ({state.current} - {None})
    doomed = [r for r in releases if r not in keep]
    used = " ".join(sorted({state.venvs.get(r, "") for r in keep} - {""} | {venv}))
    commands = [sh("touch", layout.releases / release_id / DEPLOYED_MARK)]
    if doomed:
        paths = [layout.releases / r for r in doomed] + [history_path(server, r) for r in doomed]
        commands.append(sh("rm", "-rf", *paths))
    if used:
        # Absolute paths, no cd: venvs/ is root's (provision), and a deploy refuses a layout that is not.
        commands.append(
            f"for v in {sh(layout.venvs)}/*; do n=${{v##*/}}; "
            f'case \' {used} \' in *" $n "*) ;; *) rm -rf -- "$v" ;; esac; done'
        )
    server.root(" ; ".join(commands) + "; true", what="marking the release and pruning old ones")
    return doomed
