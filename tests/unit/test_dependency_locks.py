"""The hashed locks match pyproject.toml: what it declares is pinned, and the tools' lock keeps the runtime pins."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
RELOCK = "pyproject.toml changed without a new lock: run `invoke lock` and commit both lock files"


def pins(lock: str) -> dict[str, str]:
    """Each package of a lock file and its pinned version."""
    text = (REPO / lock).read_text()
    return {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", text, re.M)}


def declared(*groups: list[str]) -> list[Requirement]:
    """The requirements of these pyproject lists, without the project's reference to its own extras."""
    requirements = [Requirement(line) for group in groups for line in group]
    return [r for r in requirements if canonicalize_name(r.name) != canonicalize_name(PROJECT["name"])]


def unpinned(requirements: list[Requirement], locked: dict[str, str]) -> list[str]:
    return [
        f"{r} (locked: {locked.get(canonicalize_name(r.name), 'nothing')})"
        for r in requirements
        if canonicalize_name(r.name) not in locked
        or not r.specifier.contains(locked[canonicalize_name(r.name)], prereleases=True)
    ]


def test_the_runtime_lock_pins_every_runtime_dependency():
    assert unpinned(declared(PROJECT["dependencies"]), pins("requirements.lock")) == [], RELOCK


def test_the_tools_lock_pins_every_dependency_of_the_runtime_ops_and_dev():
    extras = PROJECT["optional-dependencies"]
    everything = declared(PROJECT["dependencies"], extras["ops"], extras["dev"])
    assert unpinned(everything, pins("requirements-dev.lock")) == [], RELOCK


def test_the_tools_lock_has_the_runtime_pins_so_tests_run_what_a_deploy_installs():
    runtime, tools = pins("requirements.lock"), pins("requirements-dev.lock")
    assert {name: (version, tools.get(name)) for name, version in runtime.items() if tools.get(name) != version} == {}


def test_every_pin_of_both_locks_carries_a_hash():
    for lock in ("requirements.lock", "requirements-dev.lock"):
        entries = re.split(r"\n(?=[A-Za-z0-9])", (REPO / lock).read_text())
        pinned = [entry for entry in entries if re.match(r"[A-Za-z0-9_.\-]+==", entry)]
        assert pinned and all("--hash=sha256:" in entry for entry in pinned), lock
