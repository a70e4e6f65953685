"""`fab rollback` refuses a release whose code predates the Redis key prefix: the check reads the release's own
settings file on the server (a grep as root, none of the release's code runs), built and parsed without a server."""

import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from deploy.app import REDIS_KEY_PREFIX, REDIS_PREFIX_LINE, REDIS_PREFIX_SETTINGS
from deploy.commands import release as release_commands
from deploy.errors import DeployError
from deploy.release import redis_prefixed, refuse_unprefixed

REPO = Path(__file__).resolve().parents[2]
RELEASE_ID = "20260101000000-abcdef123456"


def release_tree(root: Path, settings: str | None) -> Path:
    """A release directory as unpacked on a server: REVISION and the settings file (`settings`'s text, or none)."""
    release_dir = root / "releases" / RELEASE_ID
    release_dir.mkdir(parents=True)
    (release_dir / "REVISION").write_text(f"{RELEASE_ID}\n")
    if settings is not None:
        path = release_dir / REDIS_PREFIX_SETTINGS
        path.parent.mkdir(parents=True)
        path.write_text(settings)
    return release_dir


def current_settings() -> str:
    return (REPO / REDIS_PREFIX_SETTINGS).read_text()


def settings_before_the_prefix() -> str:
    """This commit's settings file without the prefix: every line naming REDIS_KEY_PREFIX gone, as the code before it
    had them (kombu's and the result backend's options without global_keyprefix)."""
    return "".join(line for line in current_settings().splitlines(keepends=True) if "REDIS_KEY_PREFIX" not in line)


def check(release_dir: Path) -> str:
    command = release_commands.redis_prefix_check(PurePosixPath(release_dir))
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    return done.stdout


def test_this_commits_settings_hold_the_marker_line_and_a_release_of_it_passes(tmp_path):
    assert REDIS_PREFIX_LINE in current_settings().splitlines()
    assert REDIS_PREFIX_LINE == f'REDIS_KEY_PREFIX = "{REDIS_KEY_PREFIX}"'
    assert redis_prefixed(check(release_tree(tmp_path, current_settings()))) is True


def test_a_release_whose_settings_lack_the_prefix_is_found_unprefixed(tmp_path):
    text = settings_before_the_prefix()
    assert "CELERY_BROKER_TRANSPORT_OPTIONS" in text and "REDIS_KEY_PREFIX" not in text
    assert redis_prefixed(check(release_tree(tmp_path, text))) is False


def test_a_release_with_another_prefix_or_only_a_mention_of_it_is_found_unprefixed(tmp_path):
    other = current_settings().replace(REDIS_PREFIX_LINE, 'REDIS_KEY_PREFIX = "other-app:"')
    assert redis_prefixed(check(release_tree(tmp_path / "a", other))) is False
    mention = settings_before_the_prefix() + f"# {REDIS_PREFIX_LINE}\n"
    assert redis_prefixed(check(release_tree(tmp_path / "b", mention))) is False


def test_a_release_without_the_settings_file_is_found_unprefixed(tmp_path):
    assert redis_prefixed(check(release_tree(tmp_path, None))) is False


def test_a_copy_of_a_real_release_tree_passes_and_fails_by_its_settings_only(tmp_path):
    release_dir = tmp_path / "releases" / RELEASE_ID
    shutil.copytree(REPO / "project" / "prayer_room_api" / "settings", release_dir / Path(REDIS_PREFIX_SETTINGS).parent)
    assert redis_prefixed(check(release_dir)) is True
    (release_dir / REDIS_PREFIX_SETTINGS).write_text(settings_before_the_prefix())
    assert redis_prefixed(check(release_dir)) is False


def test_the_check_runs_no_code_of_the_release_and_quotes_the_path():
    command = release_commands.redis_prefix_check(PurePosixPath("/srv/app/releases/x; rm -rf /"))
    assert "python" not in command and ".venv" not in command and "manage" not in command
    assert command.startswith("if grep -qxF -e ")
    assert "'/srv/app/releases/x; rm -rf /" in command


def test_an_unexpected_answer_is_an_error_not_a_pass():
    assert redis_prefixed("prefixed\n") is True and redis_prefixed("unprefixed\n") is False
    for junk in ("", "grep: not found", "prefixed\nprefixed"):
        with pytest.raises(DeployError, match="unexpected answer"):
            redis_prefixed(junk)


def test_the_refusal_is_one_line_naming_the_release_and_what_to_do_instead():
    message = refuse_unprefixed(RELEASE_ID)
    assert "\n" not in message
    assert RELEASE_ID in message and REDIS_KEY_PREFIX in message and "nothing was changed" in message
    assert "`fab rollback --to`" in message and "`fab deploy`" in message
