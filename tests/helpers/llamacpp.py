"""llama.cpp's tooling for the tests: `tunepipe llamacpp-env`'s own build, made once into tunepipe's cache.

`$TUNEPIPE_CACHE` (CI points it at a directory kept for the run) or `~/.cache/tunepipe`: the first test session
of a CI run builds it (the llama-cpp-python wheel compiles in about 6 minutes on 2 cores, less from pip's wheel
cache; the two tools in seconds), later ones find it. Skipped only when the package registry refuses the
packages; any other build failure fails the test that needs it.
"""

from __future__ import annotations

import pytest

from tests.helpers.vllm import REGISTRY_REFUSAL


def llamacpp_tools_or_skip():
    from tunepipe.tasks.llamacpp.env import LlamaCppEnvError, build_tools, is_built, require_tools

    if is_built():
        return require_tools()
    try:
        return build_tools()
    except LlamaCppEnvError as exc:
        if REGISTRY_REFUSAL.search(str(exc)):
            pytest.skip(f"the package registry refused llama-cpp-python's packages, so llama.cpp tests cannot run here: {exc}")
        raise
