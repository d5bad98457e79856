"""A GGUF file as a base model: converted once into a normal Hugging Face model directory.

llama.cpp's GGUF is how many pretrained models are shipped (and the only real model available
offline here, see ../shared/STACK.md). transformers reads GGUF (`from_pretrained(dir,
gguf_file=...)`, through the `gguf` package) and dequantises the weights to float32, but a model
loaded that way refuses `save_pretrained` ("quantized with gguf and is not serializable"). So the
conversion builds a fresh model from the same config (without the GGUF's quantization marker),
loads the dequantised state dict into it strictly, and saves that with the tokenizer: identical
logits, and every later stage (training, export, vLLM) sees an ordinary model directory.

The directory is cached under the GGUF file's sha256, so the same file is converted once and a
changed file is converted again. `tunepipe_gguf.json` inside it records where it came from and
the quantisation the weights were dequantised from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tunepipe.tasks.core.runtime import cache_root

PROVENANCE_FILE = "tunepipe_gguf.json"


def gguf_file_in(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file a model name points at: the file itself, or the single `.gguf` in a directory
    that holds no `config.json` (a directory with one is an HF model that happens to ship a GGUF too)."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{path}: holds {len(found)} .gguf files ({', '.join(f.name for f in found)}): name one")
    return None


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The file's sha256, memoised per process by (path, size, mtime): a model is loaded several times a run."""
    stat = Path(path).stat()
    signature = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if signature not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        _SHA256[signature] = digest.hexdigest()
    return _SHA256[signature]


def gguf_quantisation(path: Path) -> str:
    """The GGUF's file type as llama.cpp names it (Q4_1, Q8_0, F16, ...), read from its metadata."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {value}"


def convert(gguf: Path, dest: Path) -> dict[str, Any]:
    """Write the HF model directory for `gguf` at `dest` (which must not exist); returns the provenance."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    provenance = {
        "gguf_file": name,
        "gguf_sha256": file_sha256(gguf),
        "dequantised_from": gguf_quantisation(gguf),
        "note": f"weights dequantised from {gguf_quantisation(gguf)} to float32 by transformers' GGUF loader",
    }
    (partial / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    partial.replace(dest)
    return provenance


def materialise(gguf: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The cached HF directory for a GGUF file, converting it on first use (atomically)."""
    gguf = Path(gguf).resolve()
    dest = Path(cache_dir) / "gguf" / file_sha256(gguf)[:16]
    if not (dest / PROVENANCE_FILE).is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        convert(gguf, dest)
    return dest


def gguf_source(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file a model name points at (the file, or a directory's only `.gguf`), else None (hub ids too)."""
    return gguf_file_in(name_or_path) if Path(name_or_path).exists() else None


def model_dir(name_or_path: str | os.PathLike) -> str:
    """What `from_pretrained` (and vLLM, lm-eval, PEFT's base_model_name_or_path) is given for a model name:
    a GGUF's converted HF directory in tunepipe's cache (converted on first use), else the name unchanged.
    Here rather than in modeling.py so that the data stage's token counter resolves a GGUF without taking
    the whole loader into its key."""
    gguf = gguf_source(name_or_path)
    if gguf is None:
        return str(name_or_path)
    return str(materialise(gguf, cache_root()))
