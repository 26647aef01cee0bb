"""constraints.txt pins every dependency to the version CI tests, and the suite runs on them.

A dependency added to pyproject.toml without a pin would float in CI again (a new release could
turn main red with no commit of ours); a pin outside pyproject's range would make the install
fail. The installed check is what .ci/run's `-c constraints.txt` is for: the suite tests the
pinned set, not whatever the index held that day.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("test", "bench")


def pins() -> dict[str, str]:
    """Package name (normalised) -> pinned version."""
    found = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator and version, f"constraints.txt:{number}: {line!r} is not name==version"
        found[canonicalize_name(name)] = version
    return found


def requirements(extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    return [Requirement(text) for text in
            (*project["dependencies"], *(item for extra in extras for item in optional[extra]))]


def test_every_dependency_is_pinned_inside_its_range() -> None:
    pinned = pins()
    for requirement in requirements():
        version = pinned.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} has no pin in constraints.txt"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {requirement.name}=={version}, outside pyproject's "
            f"{requirement.specifier}")


def test_the_suite_runs_on_the_pinned_versions() -> None:
    """The runtime and test dependencies, which .ci/run installs (not the bench's)."""
    pinned, drifted = pins(), []
    for requirement in requirements(("test",)):
        name = canonicalize_name(requirement.name)
        installed = metadata.version(requirement.name)
        if installed != pinned.get(name):
            drifted.append(f"{name} {installed} (pinned {pinned.get(name, 'nowhere')})")
    assert not drifted, ("installed versions differ from constraints.txt: " + ", ".join(drifted)
                         + "; install with -c constraints.txt (.ci/run does)")
