"""The wheel is one `tunepipe` package that runs the bundled quickstart from anywhere.

A user's own `tasks.py` and `flows/` in the working directory come first on `sys.path` for
`python -c`, notebooks and workers; they must not shadow anything of ours. The wheel is installed
into a fresh venv whose only extra path is the project venv's site-packages (for the
dependencies); no source tree is reachable from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (found,) = out.glob("tunepipe-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # Dependencies from the project venv: path lines only (every site-packages this interpreter
    # reads, also those a .pth of it adds), so its editable-install hook is not run and the
    # source tree stays out of reach.
    dependency_dirs = [p for p in sys.path if p.endswith("site-packages")] or [sysconfig.get_paths()["purelib"]]
    Path(site, "project_dependencies.pth").write_text("".join(d + "\n" for d in dependency_dirs))
    return venv


@pytest.fixture
def user_project(tmp_path) -> Path:
    """A directory of someone else's project: its own `tasks.py` and `flows/` package."""
    (tmp_path / "tasks.py").write_text("raise ImportError('the user project tasks.py was imported')\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("raise ImportError('the user project flows/ was imported')\n")
    (tmp_path / "schemas.py").write_text("raise ImportError('the user project schemas.py was imported')\n")
    return tmp_path


def test_the_wheel_holds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"tunepipe", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    # The quickstart and the profiles ship as package data.
    assert "tunepipe/examples/quickstart/pipeline.yaml" in names
    assert "tunepipe/examples/quickstart/data/triples.jsonl" in names
    assert "tunepipe/environments/cpu.yaml" in names
    assert not any(name.startswith("tunepipe/tests/") or name.startswith("tunepipe/benchmarks/") for name in names)
    # The build script sits in the package's directory but is not a module of it.
    assert "tunepipe/setup.py" not in names


def test_the_wheel_carries_its_licence_and_classifiers(wheel):
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    text = archive.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "Classifier: Programming Language :: Python :: 3.11" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
    # Ranges, not exact pins, for the libraries a user's own stack is likely to hold.
    for requirement in ("Requires-Dist: transformers<6,>=5.23", "Requires-Dist: trl<2,>=1.12", "Requires-Dist: prefect<4,>=3.8.8"):
        assert requirement in text


def _tunepipe(venv: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PREFECT_HOME", "PREFECT_API_URL")}
    return subprocess.run(
        [str(venv / "bin" / "tunepipe"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_installed_wheel_runs_the_quickstart_beside_a_user_project(fresh_venv, user_project):
    imported = subprocess.run(
        [str(fresh_venv / "bin" / "python"), "-c", "import tunepipe.tasks.core.stage as m; print(m.__file__)"],
        cwd=user_project, capture_output=True, text=True,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip().startswith(str(fresh_venv)), imported.stdout

    validated = _tunepipe(fresh_venv, user_project, "validate")
    assert validated.returncode == 0, validated.stderr
    assert "quickstart: valid" in validated.stdout

    ran = _tunepipe(fresh_venv, user_project, "run", "--until", "data", "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    data = Path(user_project, "runs", "quickstart", "artifacts", "data")
    published = [p for p in data.iterdir() if (p / "manifest.json").exists()]
    assert len(published) == 1 and (published[0] / "train.jsonl").stat().st_size > 0
