"""A release's command lines: unpack it, build its virtualenv, switch `current` to it."""

from __future__ import annotations

from pathlib import PurePosixPath

from deploy.commands import sh
from deploy.config import DeployConfig
from deploy.layout import ServerLayout


def unpack(layout: ServerLayout, release_id: str, tarball: object, venv: object, build_user: str) -> str:
    """Unpack the uploaded tarball into releases/<id> (root's, read-only to the app user), link its venv, and make
    its static directory the build user's (collectstatic fills it; it is made root's after)."""
    target = layout.releases / release_id
    return " && ".join(
        [
            "umask 022",
            sh("install", "-d", "-o", "root", "-g", "root", "-m", "755", layout.releases, layout.venvs, target),
            sh("tar", "-xf", tarball, "-C", target, "--no-same-owner", "--no-same-permissions"),
            sh("rm", "-f", tarball),
            sh("ln", "-sfn", venv, target / ".venv"),
            sh("install", "-d", "-o", build_user, "-g", build_user, "-m", "755", layout.static(release_id)),
        ]
    )


def build_venv(config: DeployConfig, venv: PurePosixPath, lock: object) -> str:
    """As root, from /: a fresh virtualenv at `venv` with config.python, filled from `lock` (hash-checked)."""
    pip = sh(
        venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore",
        "--require-hashes",
    )  # fmt: skip
    build = [
        "umask 022",
        sh("rm", "-rf", venv),
        sh(config.python, "-m", "venv", venv),
        # NOTE: --no-deps: the lock is complete; pip must not re-resolve markers for another
        # Python than the one it was compiled with (pip's "secure installs" advice).
        f"{pip} {sh('--no-deps', '-r', lock)}",
    ]
    return f"cd / && {' && '.join(build)}"


def switch(layout: ServerLayout, release_id: str) -> str:
    """Point `current` at releases/<id> atomically (a new symlink renamed over the old one), and `previous` at the
    release it replaces, whose static files nginx keeps serving to the programs not yet restarted."""
    target = layout.releases / release_id
    tmp, tmp_previous = layout.root / f".current-{release_id}", layout.root / f".previous-{release_id}"
    keep_previous = (
        f'old="$(readlink {sh(layout.current)})"; '
        f'if [ -n "$old" ] && [ "$old" != {sh(target)} ]; then '
        f'ln -sfn "$old" {sh(tmp_previous)} && mv -T {sh(tmp_previous)} {sh(layout.previous)}; fi'
    )
    return f"{{ {keep_previous}; }} && {sh('ln', '-sfn', target, tmp)} && {sh('mv', '-T', tmp, layout.current)}"
