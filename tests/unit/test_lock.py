"""constraints.txt (the exact lock the README's commands and CI install from) satisfies the
package's ranges, and pins every distribution the package and its dev extra require."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO


def locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = Version(version.split(";")[0].strip())
    return pins


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def test_the_lock_pins_every_runtime_and_dev_requirement_within_its_range():
    pins = locked()
    for requirement in requirements("dev"):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is required but not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_optional_extras_that_are_locked_are_within_their_ranges():
    pins = locked()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for extra in project["optional-dependencies"]:
        for requirement in requirements(extra):
            name = canonicalize_name(requirement.name)
            if name in pins:
                assert requirement.specifier.contains(pins[name], prereleases=True), (
                    f"[{extra}] {requirement}: constraints.txt pins {pins[name]}"
                )


def test_readme_and_ci_install_from_the_lock():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "-c constraints.txt" in ci
    assert readme.count("-c constraints.txt") >= 2  # both opening commands
