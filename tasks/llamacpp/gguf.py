"""GGUF files from a transformers model directory with llama.cpp's own tools (`tunepipe llamacpp-env`):
convert (f16/bf16/f32/q8_0), importance matrix, quantize, LoRA adapters, and the llama.cpp side of the checks
(run by `worker.py` in the tooling's venv). Every tool is a subprocess of the pinned tooling; a failure is a
`GGUFError` with the tool's last lines."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tunepipe.tasks.llamacpp.env import LlamaCppTools

HERE = Path(__file__).resolve().parent
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # convert_hf_to_gguf.py writes these directly
# llama-quantize's names for the k-quants and i-quants, which an importance matrix improves (the i-quants
# below 4 bits refuse to run without one).
IMATRIX_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                 "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq3_m", "iq4_xs", "iq4_nl")


class GGUFError(RuntimeError):
    """A llama.cpp tool failed; the message holds its command and last output lines."""


def _run(cmd: list[str], what: str, timeout: float = 3600, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        raise GGUFError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")
    return done.stdout + done.stderr


# Split regexes of tokenizer.json pre-tokenizers (Sequence[Split, ByteLevel without regex]) and the name
# llama.cpp's vocabulary code implements each under (src/llama-vocab.cpp).
SPLIT_REGEX_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def pre_tokenizer_of(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer name for a tokenizer.json whose splitting llama.cpp implements under a name:
    a byte-level BPE with the GPT-2 regex (`ByteLevel`, use_regex) is `gpt-2`; a Split with Qwen2's or Llama 3's
    regex before a plain ByteLevel is `qwen2` / `llama-bpe`. None when it cannot say."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return SPLIT_REGEX_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


# Architectures whose converter in the pinned llama.cpp (llama-cpp-python 0.3.36, conversion/gemma.py and phi.py)
# reads the vocabulary only from a sentencepiece `tokenizer.model`, with no tokenizer.json fallback (Gemma 3 and
# Llama have one). Phi-3's converter takes tokenizer.json only from a `GPT2Tokenizer` (Phi-4).
SENTENCEPIECE_ONLY = {"GemmaForCausalLM": "Gemma", "Gemma2ForCausalLM": "Gemma 2", "Phi3ForCausalLM": "Phi-3"}


def sentencepiece_family(model_dir: Path) -> str | None:
    """The family name when the pinned converter reads this model's vocabulary only from a sentencepiece
    tokenizer.model (None when it reads tokenizer.json too)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return None
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    family = next((SENTENCEPIECE_ONLY[a] for a in architectures if a in SENTENCEPIECE_ONLY), None)
    tokenizer_config = model_dir / "tokenizer_config.json"
    if family == "Phi-3" and tokenizer_config.is_file() and json.loads(tokenizer_config.read_text()).get("tokenizer_class") == "GPT2Tokenizer":
        return None
    return family


def converter_refusal(model_dir: Path) -> str | None:
    """Why llama.cpp's converter cannot read this model directory's tokenizer (None when it can), said before
    converting, so that the run stops on what is missing rather than on the converter's traceback."""
    family = sentencepiece_family(model_dir)
    if family is None or (model_dir / "tokenizer.model").is_file():
        return None
    return (f"llama.cpp's converter reads a {family} model's vocabulary only from its sentencepiece tokenizer.model, and "
            f"{model_dir} has none (its tokenizer is tokenizer.json only): put the base model's tokenizer.model beside "
            "its tokenizer files (the published checkpoints ship one), or drop gguf from export.targets")


def convert_script(tools: LlamaCppTools, script: Path, pre_tokenizer: str | None, args: list[str], what: str) -> str:
    cmd = [str(tools.python), str(HERE / "convert_run.py"), str(tools.source), str(script), pre_tokenizer or "-", *args]
    # the converter reads no hub; offline makes sure of it
    return _run(cmd, what, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def convert_model(tools: LlamaCppTools, model_dir: Path, dest: Path, outtype: str, pre_tokenizer: str | None) -> Path:
    """convert_hf_to_gguf.py: a transformers directory to one GGUF of `outtype` (f32, f16, bf16 or q8_0)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    convert_script(tools, tools.converter, pre_tokenizer or pre_tokenizer_of(model_dir),
                   [str(model_dir), "--outfile", str(dest), "--outtype", outtype], f"convert_hf_to_gguf.py ({outtype})")
    return dest


def convert_lora(tools: LlamaCppTools, adapter_dir: Path, base_dir: Path, dest: Path, pre_tokenizer: str | None) -> Path:
    """convert_lora_to_gguf.py: a PEFT LoRA adapter to a GGUF LoRA (f16) for llama.cpp's --lora."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    convert_script(tools, tools.lora_converter, pre_tokenizer or pre_tokenizer_of(base_dir),
                   [str(adapter_dir), "--base", str(base_dir), "--outfile", str(dest), "--outtype", "f16"],
                   "convert_lora_to_gguf.py")
    return dest


def compute_imatrix(tools: LlamaCppTools, model: Path, text: str, dest: Path, *, context: int, chunks: int, threads: int) -> dict[str, Any]:
    """llama-imatrix over `text` (the run's own training and validation conversations)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "imatrix.txt"
        corpus.write_text(text)
        log = _run([str(tools.imatrix), "-m", str(model), "-f", str(corpus), "-o", str(dest), "-c", str(context),
                    "--chunks", str(chunks), "-t", str(threads), "--no-ppl"], "llama-imatrix")
    return {"file": dest.name, "context": context, "chunks_requested": chunks, "chunks": _count(log, "compute_imatrix: computing over")}


def _count(log: str, marker: str) -> int | None:
    """The number after `marker` in a tool's log ("compute_imatrix: computing over 12 chunks ...")."""
    for line in log.splitlines():
        if marker in line:
            words = line.split(marker, 1)[1].split()
            if words and words[0].isdigit():
                return int(words[0])
    return None


def quantize(tools: LlamaCppTools, source: Path, dest: Path, qtype: str, *, imatrix: Path | None, threads: int) -> Path:
    """llama-quantize `source` (f16) to `qtype`, with the importance matrix when given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(tools.quantize)] + (["--imatrix", str(imatrix)] if imatrix else []) + [str(source), str(dest), qtype.upper(), str(threads)]
    _run(cmd, f"llama-quantize {qtype}")
    return dest


def run_worker(tools: LlamaCppTools, request: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """One request to worker.py in the tooling's venv (llama.cpp inference); its JSON answer."""
    with tempfile.TemporaryDirectory() as tmp:
        req, ans = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        req.write_text(json.dumps(request))
        threads = str(request.get("threads", 1))
        _run([str(tools.python), str(HERE / "worker.py"), str(req), str(ans)], f"llama.cpp on {Path(request['model']).name}",
             timeout=timeout, env={"OMP_NUM_THREADS": threads})
        return json.loads(ans.read_text())
