"""llama.cpp's tooling, built once by one command: `tunepipe llamacpp-env`.

Everything comes from one pinned release of PyPI's `llama-cpp-python` (a source distribution that
vendors llama.cpp), so the converter, the quantizer, the imatrix tool and the inference binding
are the same llama.cpp version. It lives in tunepipe's cache (`$TUNEPIPE_CACHE`, else
`~/.cache/tunepipe`) at `<cache>/llamacpp/<version>/`:

    venv/         a venv with llama-cpp-python (the binding: inference, logits, chat templates), gguf,
                  sentencepiece (the converter imports it even for BPE tokenizers) and the converter's
                  torch/transformers, pinned like tunepipe's own
    llama.cpp/    the sdist's vendor/llama.cpp: convert_hf_to_gguf.py, convert_lora_to_gguf.py,
                  conversion/, gguf-py/ (the converter must run with its own gguf-py) and the tools' sources
    bin/          llama-quantize and llama-imatrix, compiled from those sources against the binding's
                  own shared libraries (libllama, libllama-common, libggml*), so seconds instead of a
                  second full llama.cpp build

The binding's wheel is compiled by pip from the same sdist (about 6 minutes on 2 cores the first
time; pip's wheel cache keeps it). The marker file is written last, after a check that imports the
binding and runs both tools: an interrupted build never looks ready, and the next command starts
again from scratch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunepipe.tasks.core.runtime import cache_root, log_tail


# -2: the venv also holds llama_cpp.server's extras (`tunepipe serve --engine llamacpp`). A tooling built under an
# earlier marker is completed in place (pip installs SERVER_PACKAGES, seconds), never rebuilt from scratch.
MARKER = "tunepipe-llamacpp-2.json"
EARLIER_MARKERS = ("tunepipe-llamacpp.json",)
VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp is the one every tool here comes from
PACKAGES = (
    f"llama-cpp-python=={VERSION}", "gguf==0.19.0", "sentencepiece==0.2.3",
    # the converter imports torch and transformers: the same pins as tunepipe's (pyproject.toml)
    "torch==2.13.0", "transformers==5.23.0",
)
# llama-cpp-python[server]'s extras, pinned like tunepipe's own where it has them (pyproject.toml)
SERVER_PACKAGES = (
    f"llama-cpp-python[server]=={VERSION}", "fastapi==0.150.0", "starlette==1.10.0", "uvicorn==0.55.0",
    "pydantic-settings==2.16.3", "sse-starlette==3.7.1", "starlette-context==0.3.6",
)
FIX = "run `tunepipe llamacpp-env` (builds llama.cpp's tooling into tunepipe's cache, ~7 minutes once)"


class LlamaCppEnvError(RuntimeError):
    """llama.cpp's tooling is missing, broken, or could not be built; the message names the command that fixes it."""


@dataclass(frozen=True)
class LlamaCppTools:
    """Paths of a built tooling directory."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def source(self) -> Path:
        return self.root / "llama.cpp"

    @property
    def quantize(self) -> Path:
        return self.root / "bin" / "llama-quantize"

    @property
    def imatrix(self) -> Path:
        return self.root / "bin" / "llama-imatrix"

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    @property
    def lora_converter(self) -> Path:
        return self.source / "convert_lora_to_gguf.py"

    def missing(self) -> list[str]:
        paths = (self.root / MARKER, self.python, self.converter, self.lora_converter, self.quantize, self.imatrix)
        return [str(p) for p in paths if not p.exists()]


def tools_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "llamacpp" / VERSION


def is_built(root: Path | None = None) -> bool:
    return not LlamaCppTools(tools_dir(root)).missing()


def require_tools(root: Path | None = None) -> LlamaCppTools:
    """The built tooling, or one clear error naming the command that builds it."""
    tools = LlamaCppTools(tools_dir(root))
    missing = tools.missing()
    if missing:
        raise LlamaCppEnvError(f"llama.cpp's tooling is not built in {tools.root} (missing {missing[0]}): {FIX}")
    return tools


def build_tools(*, root: Path | None = None, force: bool = False, say: Callable[[str], None] = print) -> LlamaCppTools:
    """Build (or keep) the tooling; idempotent: a built one is kept unless `force`."""
    target = tools_dir(root)
    tools = LlamaCppTools(target)
    if is_built(root) and not force:
        say(f"llama.cpp tooling {target} is ready (llama-cpp-python {VERSION})")
        return tools
    if not force and _completable(tools):
        return _complete(tools, say)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    log = target.parent / f"{VERSION}.build.log"
    say(f"building llama.cpp tooling (llama-cpp-python {VERSION}) into {target} (minutes; log {log})")
    with log.open("w") as out:
        _step([sys.executable, "-m", "venv", str(target / "venv")], out, log, "create the venv")
        _step([str(tools.python), "-m", "pip", "install", *PACKAGES], out, log, f"pip install {' '.join(PACKAGES)}")
        _step([str(tools.python), "-m", "pip", "install", *SERVER_PACKAGES], out, log, "pip install llama_cpp.server's extras")
        with tempfile.TemporaryDirectory() as tmp:
            _step([str(tools.python), "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", tmp,
                   f"llama-cpp-python=={VERSION}"], out, log, "pip download the llama-cpp-python sdist")
            unpack_vendored(next(Path(tmp).glob("llama_cpp_python-*.tar.gz")), tools.source)
        for binary, sources in (("llama-quantize", ["tools/quantize/quantize.cpp", "tools/quantize/main.cpp"]),
                                ("llama-imatrix", ["tools/imatrix/imatrix.cpp"])):
            _step(compile_command(tools, binary, sources), out, log, f"compile {binary}")
        _step([str(tools.python), "-c", "import llama_cpp, llama_cpp.server.app, gguf, sentencepiece, torch, transformers; "
               "print(llama_cpp.__version__)"],
              out, log, "import the binding and the converter's packages")
        for binary in (tools.quantize, tools.imatrix):
            _step([str(binary), "--help"], out, log, f"run {binary.name}", ok=(0, 1))
    _write_marker(tools)
    say(f"llama.cpp tooling ready: {target}")
    return tools


def _write_marker(tools: LlamaCppTools) -> None:
    (tools.root / MARKER).write_text(json.dumps({"version": VERSION, "packages": [*PACKAGES, *SERVER_PACKAGES]}) + "\n")


def _completable(tools: LlamaCppTools) -> bool:
    """A tooling built under an earlier marker: everything there but the server's packages."""
    return (any((tools.root / m).exists() for m in EARLIER_MARKERS)
            and tools.missing() == [str(tools.root / MARKER)])


def _complete(tools: LlamaCppTools, say: Callable[[str], None]) -> LlamaCppTools:
    log = tools.root.parent / f"{VERSION}.server.log"
    say(f"adding llama_cpp.server's packages to {tools.root} (log {log})")
    with log.open("w") as out:
        _step([str(tools.python), "-m", "pip", "install", *SERVER_PACKAGES], out, log, "pip install llama_cpp.server's extras")
        _step([str(tools.python), "-c", "import llama_cpp.server.app"], out, log, "import llama_cpp.server")
    _write_marker(tools)
    say(f"llama.cpp tooling ready: {tools.root}")
    return tools


def unpack_vendored(sdist: Path, dest: Path) -> None:
    """The sdist's vendor/llama.cpp (converters, gguf-py, sources) as `dest`."""
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(dest, members=[m for m in members if m.name], filter="data")


def binding_libs(tools: LlamaCppTools) -> Path:
    """Where the binding's wheel put llama.cpp's shared libraries and headers (site-packages/lib, /include)."""
    found = sorted((tools.root / "venv" / "lib").glob("python3*/site-packages/lib/libllama-common.so"))
    if not found:
        raise LlamaCppEnvError(f"the llama-cpp-python wheel in {tools.root / 'venv'} has no libllama-common.so; {FIX} --force")
    return found[0].parent


def compile_command(tools: LlamaCppTools, binary: str, sources: list[str]) -> list[str]:
    """g++ on the tool's sources, linked to the binding's libraries (RPATH, not RUNPATH: libllama-common's own
    dependencies resolve through it too)."""
    lib = binding_libs(tools)
    src = tools.source
    (tools.root / "bin").mkdir(exist_ok=True)
    return ["g++", "-std=c++17", "-O2", f"-I{lib.parent / 'include'}", f"-I{src / 'common'}", f"-I{src / 'vendor'}",
            f"-I{src / Path(sources[0]).parent}", *[str(src / s) for s in sources], f"-L{lib}",
            "-lllama-common", "-lllama", "-lggml", "-lggml-base", "-lpthread", f"-Wl,--disable-new-dtags,-rpath,{lib}",
            "-o", str(tools.root / "bin" / binary)]


def _step(cmd: list[str], out, log: Path, what: str, ok: tuple[int, ...] = (0,)) -> None:
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code not in ok:
        raise LlamaCppEnvError(f"building llama.cpp's tooling failed at `{what}` (exit {code}):\n{log_tail(log)}\n"
                               f"full log: {log}; after fixing the cause, rerun `tunepipe llamacpp-env`")
