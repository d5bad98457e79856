"""The one place models and tokenizers are loaded, and how a model enters a cache key.

A model is named by a hub id (`owner/name`, optionally at a revision), a local directory, or a
GGUF file (or a directory holding exactly one `.gguf`); all go through the same `Auto*` code path:
a GGUF is converted once into an HF directory in tunepipe's cache (`model_dir`, see gguf_base.py).
Cache keys never use the bare name: a local directory enters as a digest of its files (moving it
changes nothing, editing a file changes the key), a GGUF as the sha256 of its bytes, a hub model as
`hub:<id>@<revision>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunepipe.schemas.base_model import BaseModelConfig

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from tunepipe.schemas.base import looks_like_hub_id
from tunepipe.tasks.core.fingerprint import content_digest, glob_files
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.gguf_base import PROVENANCE_FILE, file_sha256, gguf_source, model_dir  # noqa: F401 (model_dir: the name callers use)

DTYPES = ("auto", "float32", "bfloat16", "float16")

log = logging.getLogger("tunepipe.modeling")

_DIGEST_CACHE: dict[tuple, str] = {}
_DIGEST_LOCK = threading.Lock()


def is_local(name_or_path: str | os.PathLike) -> bool:
    """True when the name is an existing local directory or file."""
    return Path(name_or_path).exists()


class ModelUnavailable(StageFailed, FileNotFoundError):
    """A model that cannot be loaded here; the message says how to fix it. A StageFailed, so the
    CLI shows it as one line (a FileNotFoundError for callers that catch that)."""


def _check_name(name_or_path: str | os.PathLike, revision: str | None = None, *, loading: bool = True) -> str:
    """The name, when it is a local path or a hub id (that, offline and `loading`, is in the hub cache)."""
    name = str(name_or_path)
    if is_local(name):
        return name
    if not looks_like_hub_id(name):
        raise ModelUnavailable(f"{name}: no such local model directory, and not a hub id (owner/name): give the directory "
                           "that holds the model's config.json, or a hub id")
    if loading:
        _require_cached_when_offline(name, revision)
    return name


def check_loadable(name_or_path: str | os.PathLike, revision: str | None = None) -> str:
    """The name of a model that can be loaded here, or ModelUnavailable saying how to fix it (for
    callers that load a part of a model, its config, themselves)."""
    return model_dir(_check_name(name_or_path, revision))


def _require_cached_when_offline(name: str, revision: str | None) -> None:
    """Offline (HF_HUB_OFFLINE=1), a hub id must already be in the local hub cache: say so and how
    to fix it, rather than a 300-line connection traceback."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    for filename in ("config.json", "tokenizer_config.json"):
        if isinstance(try_to_load_from_cache(name, filename, revision=revision), str):
            return
    raise ModelUnavailable(
        f"{name}: a hub id, but HF_HUB_OFFLINE=1 and the model is not in the local hub cache: download it once where "
        f"the hub is reachable (`hf download {name}`), or give a local model directory"
    )


def gguf_provenance(name_or_path: str | os.PathLike) -> dict[str, Any] | None:
    """Where a converted model came from (`tunepipe_gguf.json`: file, sha256, `dequantised_from`, note), for a
    GGUF name or its converted directory; None for any other model."""
    if not is_local(name_or_path):
        return None
    record = Path(model_dir(name_or_path)) / PROVENANCE_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    chat_template: str | None = None,
    **kwargs: Any,
):
    """`AutoTokenizer.from_pretrained`, plus: an optional chat template override, and a pad token.

    A tokenizer without a pad token gets one (see `choose_pad_token`), and the choice is logged.
    """
    from transformers import AutoTokenizer

    name = model_dir(_check_name(name_or_path, revision))
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, **kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        choice = choose_pad_token(tokenizer)
        if choice is not None:
            token, why = choice
            log.info("%s has no pad token: using %r (%s)", name, token, why)
            tokenizer.pad_token = token
    return tokenizer


def choose_pad_token(tokenizer: Any) -> tuple[str, str] | None:
    """(token, why) for a tokenizer without a pad token, or None when it has no candidate.

    A reserved padding token the vocabulary already has (Llama 3.1's `<|finetune_right_pad_id|>`)
    first, then `unk` (Mistral), then eos. Padding is masked out of attention and labels either
    way (labels come from the loss mask, never from "not a pad"), so even eos as pad does not stop
    the model from learning eos; a dedicated token still keeps padded batches readable.
    """
    for token in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {})):
        if "pad" in token.lower():
            return token, "the vocabulary's reserved padding token"
    if tokenizer.unk_token is not None:
        return tokenizer.unk_token, "no padding token in the vocabulary; unk never occurs in byte-level or trained text"
    if tokenizer.eos_token is not None:
        return tokenizer.eos_token, "no padding or unk token; pad positions are masked, so eos is still learned"
    return None


def load_config(name_or_path: str | os.PathLike, revision: str | None = None):
    """The model's transformers config (a GGUF's from its converted directory: transformers parses the
    whole file to read a GGUF's config, about as slow as the one-time conversion)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir(name_or_path), revision=revision)


def attention_for(name_or_path: str, requested: str | None, revision: str | None = None) -> str | None:
    """The attention kernel to load a model with: the profile's, unless the family needs another.

    Gemma 2's attention logit soft-capping is computed by the eager kernel only (sdpa and flash
    attention 2 skip it, so a model trained or served with them is not the published model):
    such a model loads with `eager`, and the override is logged.
    """
    try:
        config = load_config(name_or_path, revision)
    except (OSError, ValueError):
        return requested
    if getattr(config, "attn_logit_softcapping", None) and requested not in (None, "eager"):
        log.info("%s: %s uses attention logit soft-capping, which only eager attention computes: loading with eager, not %s",
                 name_or_path, config.model_type, requested)
        return "eager"
    return requested


def torch_dtype(dtype: Any):
    """A torch dtype (or "auto") from a name such as "bfloat16"; torch dtypes pass through."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {DTYPES}")
    return getattr(torch, dtype)


def quantization_config(quantization: Any):
    """A `BitsAndBytesConfig` from one, from a dict of its arguments, or from the environment's
    `QuantizationDefaults` (fields load_in_4bit, quant_type, double_quant, compute_dtype)."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if hasattr(quantization, "model_dump"):
        quantization = quantization.model_dump()
    if not isinstance(quantization, dict):
        raise TypeError(f"quantization: expected BitsAndBytesConfig, dict or QuantizationDefaults, got {type(quantization).__name__}")
    q = dict(quantization)
    if {"quant_type", "double_quant", "compute_dtype"} & q.keys():  # our QuantizationDefaults shape
        if not q.get("load_in_4bit", True):
            return None
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=q.get("double_quant", True),
            bnb_4bit_compute_dtype=torch_dtype(q.get("compute_dtype", "bfloat16")),
        )
    if "bnb_4bit_compute_dtype" in q:
        q["bnb_4bit_compute_dtype"] = torch_dtype(q["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**q)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: Any = "float32",
    attn_implementation: str | None = None,
    quantization: Any = None,
    device_map: Any = None,
    **kwargs: Any,
):
    """`AutoModelForCausalLM.from_pretrained` with the pipeline's knobs spelled once.

    `dtype`: "float32" | "bfloat16" | "float16" | "auto" or a torch dtype. `quantization`: a
    `BitsAndBytesConfig`, a dict, or the environment's `QuantizationDefaults` (4-bit NF4 for
    QLoRA); None loads full precision. `attn_implementation`: "eager", "sdpa", ... or None for
    the library default. Extra keyword arguments go to `from_pretrained` unchanged.
    """
    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.lm import bottleneck  # here, not at the top: it imports torch, which only adapter loads need

    # Adapters are loaded onto a base this function loads (training, held-out check, export,
    # evaluation, serving): tunepipe's own PEFT method must be registered in every such process
    # before `PeftModel.from_pretrained` meets a bottleneck adapter's config.
    bottleneck.register()
    name = model_dir(_check_name(name_or_path, revision))
    options: dict[str, Any] = {"revision": revision, "dtype": torch_dtype(dtype), **kwargs}
    attn_implementation = attention_for(name, attn_implementation, revision)
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    if (qconfig := quantization_config(quantization)) is not None:
        options["quantization_config"] = qconfig
    if device_map is not None:
        options["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(name, **options)


def attention_installed(kernel: str) -> bool:
    """Whether transformers can run attention kernel `kernel` in this environment (package and device)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_torch_flex_attn_available

    checks = {
        "flash_attention_2": is_flash_attn_2_available,
        "flash_attention_3": is_flash_attn_3_available,
        "flex_attention": is_torch_flex_attn_available,
    }
    return checks[kernel]() if kernel in checks else kernel in ("eager", "sdpa")


def training_attention(attn_implementation: str, packed_attention: list[str], *, padding_free: bool) -> str:
    """The attention kernel a training run loads: for padding-free packed rows, the first of the profile's
    `packed_attention` preferences that is installed (flash-attn's varlen kernel, else flex_attention with a
    document mask), otherwise `attn_implementation`.

    Which kernels are installed is a property of the environment, like the library versions, not a branch on
    the hardware: the profile names the order, this function only skips what cannot be imported.
    """
    if not padding_free or not packed_attention:
        return attn_implementation
    for kernel in packed_attention:
        if attention_installed(kernel):
            return kernel
    raise StageFailed(
        f"packed_attention {packed_attention}: none of these attention kernels is installed here "
        "(flash_attention_2/3 need the flash-attn package and a CUDA device; flex_attention needs torch >= 2.5)"
    )


def model_fingerprint(name_or_path: str | os.PathLike, revision: str | None = None) -> str:
    """What a model contributes to a cache key.

    A local directory (or file): `sha256:<digest of its files and their relative names>`; the
    directory's own location does not enter, so moving it keeps the key. A GGUF (the file, or the
    directory holding it): `gguf:sha256:<sha256 of the file's bytes>`, known without converting it.
    Digests are memoised per process by the files' (size, mtime), so a large model is hashed once. A
    hub id: `hub:<id>@<revision>` (`main` when none: pin a commit sha for reproducible caching).
    """
    name = _check_name(name_or_path, loading=False)  # a key needs no download
    if not is_local(name):
        return f"hub:{name}@{revision or 'main'}"
    gguf = gguf_source(name)
    path = (gguf or Path(name)).resolve()
    files = [path] if gguf else glob_files(path)
    signature = (str(path), tuple((str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]))
    with _DIGEST_LOCK:
        if (cached := _DIGEST_CACHE.get(signature)) is not None:
            return cached
    if gguf:
        digest = f"gguf:sha256:{file_sha256(gguf)}"  # memoised there too: model_dir needs it on every load
    else:
        digest = f"sha256:{content_digest(path)}"
    with _DIGEST_LOCK:
        _DIGEST_CACHE[signature] = digest
    return digest


def llama_config(config: "BaseModelConfig", *, vocab_size: int, **token_ids: int | None):
    """The `LlamaConfig` the section describes, for a vocabulary of `vocab_size`."""
    from transformers import LlamaConfig

    arch = config.architecture
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        rms_norm_eps=arch.rms_norm_eps,
        initializer_range=arch.initializer_range,
        use_cache=True,
        **token_ids,
    )
