"""The package list only: everything else is in pyproject.toml.

The repository root is the `tunepipe` package. setuptools' `packages.find` cannot prefix the
packages it finds, so they are listed here: every package under the design card's folders
(and the bundled examples), each as `tunepipe.<folder>...`. The wheel's only top-level package
is `tunepipe` (tests/unit/test_packaging.py builds one and checks).
"""

from setuptools import find_packages, setup

FOLDERS = ("flows", "tasks", "schemas", "environments", "examples")

setup(
    package_dir={"tunepipe": "."},
    packages=["tunepipe"] + [f"tunepipe.{name}" for name in find_packages(include=[f"{f}*" for f in FOLDERS])],
)
