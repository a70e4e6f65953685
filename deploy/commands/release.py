"""A release's command lines: unpack it, build its virtualenv, switch `current` to it."""

from __future__ import annotations

from pathlib import PurePosixPath

from deploy.app import REDIS_PREFIX_LINE, REDIS_PREFIX_SETTINGS
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


def stop_build_user(build_user: str) -> str:
    """A root shell command that kills every process of the build user: code a package ran while it built the venv
    (or collectstatic) cannot linger to change files after root has taken them over."""
    return f"{{ {sh('runuser', '-u', build_user, '--', 'sh', '-c', 'kill -KILL -1')} 2>/dev/null; true; }}"


def venv_directory(venv: PurePosixPath, build_user: str) -> str:
    """As root: any earlier attempt at `venv` removed, and an empty directory of the build user's in its place."""
    return " && ".join(
        [
            "cd /",
            "umask 022",
            stop_build_user(build_user),
            sh("rm", "-rf", venv),
            sh("install", "-d", "-o", build_user, "-g", build_user, "-m", "755", venv),
        ]
    )


def build_venv(config: DeployConfig, venv: PurePosixPath, lock: object) -> str:
    """For the build user, from /: a virtualenv at `venv` with config.python, filled from `lock` with binary wheels
    only (hash-checked): nothing is built from source, so no package code runs while installing."""
    pip = sh(
        venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
        "--only-binary", ":all:", "--require-hashes",
    )  # fmt: skip
    # NOTE: --no-deps: the lock is complete; pip must not re-resolve markers for another
    # Python than the one it was compiled with (pip's "secure installs" advice).
    return f"cd / && {sh(config.python, '-m', 'venv', venv)} && {pip} {sh('--no-deps', '-r', lock)}"


def check_venv(venv: PurePosixPath) -> str:
    """For the build user, from /: `pip check` (it runs the venv's Python, so its packages' .pth files)."""
    return f"cd / && {sh(venv / 'bin' / 'pip', 'check', '--disable-pip-version-check')}"


def venv_runs(venv: PurePosixPath) -> str:
    """For the build user, from /: the venv's Python starts (an OS upgrade removes the Python a venv was made with)."""
    return f"cd / && {sh(venv / 'bin' / 'python', '-c', 'pass')}"


def hand_over_venv(venv: PurePosixPath, build_user: str, done_mark: str) -> str:
    """As root: the build user's processes gone, `venv` made root's and read-only to everyone else (no set-id bit),
    checked root's to the last file, then marked complete."""
    return " && ".join(
        [
            "cd /",
            stop_build_user(build_user),
            sh("chown", "-R", "-h", "root:root", venv),
            sh("chmod", "-R", "go-w,ug-s", venv),
            f'test -z "$(find {sh(venv)} ! -user root -print -quit)"',
            sh("touch", venv / done_mark),
        ]
    )


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


def redis_prefix_check(release_dir: PurePosixPath) -> str:
    """Whether a release's code names its Redis keys under the app's prefix: its settings file read with grep (no code
    of the release runs), `prefixed` when it holds deploy.app's REDIS_PREFIX_LINE, else (or when it is missing)
    `unprefixed`."""
    settings = release_dir / REDIS_PREFIX_SETTINGS
    return f"if grep -qxF -e {sh(REDIS_PREFIX_LINE)} -- {sh(settings)}; then echo prefixed; else echo unprefixed; fi"
