"""The package list only: everything else is in pyproject.toml.

The repository root is the `tunepipe` package. setuptools' `packages.find` cannot prefix the
packages it finds, so they are listed here: every package under the design card's folders
(and the bundled examples), each as `tunepipe.<folder>...`. The wheel's only top-level package
is `tunepipe` (tests/integration/test_packaging.py builds one and checks), and this file, though
it sits in the package's directory, is not one of its modules (`import tunepipe.setup` would run
setuptools).
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

FOLDERS = ("flows", "tasks", "schemas", "environments", "examples")


class BuildPackageWithoutSetup(build_py):
    """build_py that leaves the build script itself out of the `tunepipe` package."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("tunepipe", "setup")]


setup(
    package_dir={"tunepipe": "."},
    packages=["tunepipe"] + [f"tunepipe.{name}" for name in find_packages(include=[f"{f}*" for f in FOLDERS])],
    cmdclass={"build_py": BuildPackageWithoutSetup},
)
