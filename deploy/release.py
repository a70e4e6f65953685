"""Releases: what is shipped (committed HEAD), and the server's releases/, venvs/ and `current`."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import DeployError
from deploy.remote import Server, sh

DEPLOYED_MARK = ".deployed"
VENV_DONE_MARK = ".complete"


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


def _git(repo: Path, *args: str) -> bytes:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True).stdout
    except FileNotFoundError as exc:
        raise DeployError("git is not installed here; deploy ships a git commit.") from exc
    except subprocess.CalledProcessError as exc:
        raise DeployError(f"git {' '.join(args)} failed in {repo}: {exc.stderr.decode().strip()}") from exc


def local_source(repo: Path) -> Source:
    """HEAD of `repo` and the files that differ from it (untracked ones included)."""
    sha = _git(repo, "rev-parse", "--verify", "HEAD").decode().strip()
    status = _git(repo, "status", "--porcelain", "--untracked-files=normal").decode()
    dirty = tuple(line[3:] for line in status.splitlines() if line.strip())
    return Source(repo=repo, sha=sha, dirty=dirty)


@dataclass(frozen=True)
class ServerState:
    """The releases on a server: ids oldest first, which passed verification, and which one is live."""

    releases: tuple[str, ...]
    deployed: frozenset[str]
    current: str | None
    venvs: dict[str, str]

    def previous(self, before: str | None = None) -> str | None:
        """The newest verified release older than `before` (default: the live one)."""
        before = before or self.current
        older = [r for r in self.releases if r in self.deployed and (before is None or r < before)]
        return older[-1] if older else None


def server_state(server: Server) -> ServerState:
    """One round trip: release directories, their markers and venv links, and `current`."""
    layout = server.config.layout
    script = (
        f"cd {sh(layout.releases)} 2>/dev/null || exit 0; "
        f'for d in */; do d=${{d%/}}; [ -d "$d" ] || continue; '
        f'echo "release $d $( [ -e "$d/{DEPLOYED_MARK}" ] && echo yes || echo no ) $(readlink "$d/.venv")"; done; '
        f'echo "current $(readlink {sh(layout.current)})"'
    )
    out = server.root(script, what="reading the releases").stdout
    releases, deployed, venvs, current = [], set(), {}, None
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["release"] and len(parts) >= 3:
            releases.append(parts[1])
            if parts[2] == "yes":
                deployed.add(parts[1])
            if len(parts) > 3:
                venvs[parts[1]] = parts[3]
        elif parts[:1] == ["current"] and len(parts) == 2:
            current = parts[1].rstrip("/").rsplit("/", 1)[-1]
    return ServerState(tuple(sorted(releases)), frozenset(deployed), current, venvs)


def upload_release(server: Server, source: Source, release_id: str) -> None:
    """Unpack the commit into releases/<id>, owned by the app user."""
    layout, user = server.config.layout, server.config.user
    target = layout.releases / release_id
    tarball = layout.releases / f".{release_id}.tar"
    server.upload(source.archive(release_id), tarball, owner="root", mode="0600", what="uploading the release")
    server.root(
        " && ".join(
            [
                sh("mkdir", "-p", target),
                sh("tar", "-xf", tarball, "-C", target, "--no-same-owner"),
                sh("rm", "-f", tarball),
                sh("chown", "-R", f"{user}:{user}", target),
            ]
        ),
        what="unpacking the release",
    )


def venv_ready(server: Server, lock_hash: str) -> bool:
    venv = server.config.layout.venvs / lock_hash
    return server.root(sh("test", "-e", venv / VENV_DONE_MARK), what="looking for the virtualenv", warn=True).ok


def ensure_venv(server: Server, release_id: str, lock_hash: str) -> bool:
    """Link releases/<id>/.venv to venvs/<lock hash>, building it from requirements.lock first if needed.

    Returns True when it had to build. A half-built venv (no completion mark) is rebuilt from scratch.
    """
    layout, config = server.config.layout, server.config
    venv = layout.venvs / lock_hash
    release = layout.releases / release_id
    built = False
    if not venv_ready(server, lock_hash):
        server.root(sh("install", "-d", "-o", config.user, "-g", config.user, layout.venvs), what="creating venvs/")
        server.app(
            " && ".join(
                [
                    sh("rm", "-rf", venv),
                    sh(config.python, "-m", "venv", venv),
                    # NOTE: --no-deps: the lock is complete; pip must not re-resolve markers for another
                    # Python than the one it was compiled with (pip's "secure installs" advice).
                    sh(venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", "--require-hashes")
                    + " "
                    + sh("--no-deps", "-r", release / "requirements.lock"),
                ]
            ),
            what=f"building the virtualenv from requirements.lock with {config.python}",
            timeout=1800,
        )
        check = server.app(sh(venv / "bin" / "pip", "check"), what="checking the virtualenv", warn=True)
        if check.exited != 0:
            raise DeployError(
                f"requirements.lock is incomplete for {config.python} on {server.name}: {check.stdout.strip()} -- "
                "add the missing package to pyproject.toml and re-lock (`invoke lock`)."
            )
        server.app(sh("touch", venv / VENV_DONE_MARK), what="marking the virtualenv complete")
        built = True
    server.app(sh("ln", "-sfn", venv, release / ".venv"), what="linking the virtualenv")
    return built


def switch_current(server: Server, release_id: str) -> None:
    """Point `current` at releases/<id> atomically (a new symlink renamed over the old one)."""
    layout = server.config.layout
    tmp = layout.root / f".current-{release_id}"
    server.root(
        f"{sh('ln', '-sfn', layout.releases / release_id, tmp)} && {sh('mv', '-T', tmp, layout.current)}",
        what="switching current",
    )


def mark_deployed(server: Server, release_id: str) -> None:
    server.app(sh("touch", server.config.layout.releases / release_id / DEPLOYED_MARK), what="marking the release")


def remove_release(server: Server, release_id: str) -> None:
    layout = server.config.layout
    server.root(
        sh("rm", "-rf", layout.releases / release_id, layout.etc / "releases" / f"{release_id}.conf"),
        what="removing a failed release",
    )


def prune(server: Server, state: ServerState) -> list[str]:
    """Keep the newest keep_releases releases (and always the live one); drop venvs no kept release uses."""
    keep = set(state.releases[-server.config.keep_releases :]) | {state.current}
    doomed = [r for r in state.releases if r not in keep]
    layout = server.config.layout
    used = {state.venvs.get(r, "").rstrip("/").rsplit("/", 1)[-1] for r in keep}
    paths = [layout.releases / r for r in doomed] + [layout.etc / "releases" / f"{r}.conf" for r in doomed]
    script = sh("rm", "-rf", *paths) if paths else "true"
    script += f'; cd {sh(layout.venvs)} 2>/dev/null && for v in *; do case " {" ".join(sorted(used))} " in '
    script += '*" $v "*) ;; *) rm -rf "$v" ;; esac; done; true'
    server.root(script, what="pruning old releases")
    return doomed
