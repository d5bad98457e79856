"""The export stage's `gguf` target: GGUF files of the merged model for llama.cpp, Ollama and LM Studio,
each checked against the merged model it came from (tasks/llamacpp does the llama.cpp work).

Per run, under `gguf/<run>/`:

    model-<type>.gguf        one file per `export.gguf.types` (f16 always converted and checked; published when listed)
    imatrix.gguf             the importance matrix of the k-/i-quants, from the run's own training + validation text
    lora-<run>.gguf          the LoRA adapter as a GGUF LoRA (llama.cpp --lora), on `base-f16.gguf` (kept beside it)
    Modelfile.<type>         Ollama: FROM the file, TEMPLATE, stop tokens, system prompt, num_ctx (Modelfile.lora: ADAPTER on the base)

The f16 file must reproduce the merged model (prompt tokens from the embedded template equal training's,
identical greedy answers on every held-out prompt, a divergence allowed only at a near-tie of transformers' own
next-token distribution, `export.gguf.f16_tie_margin`): anything else is a converter or template bug and fails
the stage. Quantised types report their loss (top-1 agreement, mean KL, perplexity ratio, task metric) against
`export.gguf.limits`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunepipe.schemas.export import ExportConfig, GGUFLimits, GGUFSettings
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.llamacpp import gguf as lcpp
from tunepipe.tasks.llamacpp.env import LlamaCppEnvError, require_tools
from tunepipe.tasks.llamacpp.gguf import compute_imatrix, converter_refusal, sentencepiece_family
from tunepipe.tasks.llamacpp.modelfile import modelfile, render, template_pieces
from tunepipe.tasks.llamacpp.verify import (
    Probe,
    compare,
    divergence_margins,
    first_divergence,
    gguf_side,
    reference_side,
    top1_and_kl,
)
from tunepipe.tasks.lm import checks
from tunepipe.tasks.lm.encoding import (
    encode_text,
    final_answer,
    read_split,
    reasoning_end,
    record_messages,
    render_messages,
    resolve_chat_template,
    stop_token_ids,
)
from tunepipe.tasks.lm.generation import heldout_examples
from tunepipe.tasks.lm.modeling import load_tokenizer

F16 = "f16"


def gguf_tools() -> Any:
    """The pinned llama.cpp tooling, or the stage's one clear error naming the command that builds it."""
    try:
        return require_tools()
    except LlamaCppEnvError as exc:
        raise StageFailed(f"export: target gguf: {exc}") from None


@dataclass
class RunData:
    """What one run's GGUFs are checked and calibrated on: held-out chats (the re-evaluation's prompts, in its
    order), validation conversations, and the imatrix text."""

    chats: list[list[dict[str, str]]]
    validation: list[list[dict[str, str]]]
    imatrix_records: list[list[dict[str, str]]]


def run_data(data_dir: str, tasks: list[str], per_task: int, system_prompt: str | None, settings: GGUFSettings) -> RunData:
    def prompt_of(record: dict[str, Any]) -> list[dict[str, str]]:
        messages = record_messages(record, system_prompt)
        return messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]

    chats = [prompt_of(r) for records in heldout_examples(data_dir, tasks, per_task).values() for r in records]
    validation = [record_messages(r, system_prompt) for r in read_split(data_dir, "validation")]
    train = [record_messages(r, system_prompt) for r in read_split(data_dir, "train")]
    return RunData(chats, (validation or train)[: settings.validation_texts], (train + validation)[: settings.imatrix.max_records])


def make_probe(tokenizer: Any, model: Any, data: RunData, settings: GGUFSettings, max_new_tokens: int) -> Any:
    template = resolve_chat_template("model", tokenizer)
    prompt_ids = [list(encode_text(tokenizer, render_messages(tokenizer, template, chat, True))["input_ids"]) for chat in data.chats]
    text_ids = [list(encode_text(tokenizer, render_messages(tokenizer, template, chat, False))["input_ids"])[: settings.max_text_tokens]
                for chat in data.validation]
    longest = max([len(i) for i in prompt_ids] + [len(i) for i in text_ids]) + max_new_tokens
    return Probe(chats=data.chats, prompt_ids=prompt_ids, text_ids=[t for t in text_ids if len(t) > 1],
                 stop_ids=stop_token_ids(tokenizer, model.generation_config, template), max_new_tokens=max_new_tokens,
                 n_ctx=max(256, longest + 16), threads=threads(settings))


def threads(settings: GGUFSettings) -> int:
    return settings.threads or os.cpu_count() or 1


def imatrix_text(tokenizer: Any, data: RunData) -> str:
    template = resolve_chat_template("model", tokenizer)
    return "\n".join(render_messages(tokenizer, template, chat, False) for chat in data.imatrix_records)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def limit_verdict(numbers: dict[str, Any], limits: GGUFLimits | None) -> dict[str, Any]:
    """Whether a quantised type's loss is within its limits (no limits: passed, nothing checked)."""
    reasons = []
    if limits is not None:
        if limits.min_top1_agreement is not None and numbers["top1_agreement"] < limits.min_top1_agreement:
            reasons.append(f"top-1 agreement {numbers['top1_agreement']:.4f} < {limits.min_top1_agreement}")
        if limits.max_mean_kl is not None and numbers["mean_kl"] > limits.max_mean_kl:
            reasons.append(f"mean KL {numbers['mean_kl']:.6f} > {limits.max_mean_kl}")
        if limits.max_perplexity_ratio is not None and numbers["perplexity_ratio"] > limits.max_perplexity_ratio:
            reasons.append(f"perplexity ratio {numbers['perplexity_ratio']:.4f} > {limits.max_perplexity_ratio}")
    return {"passed": not reasons, "reasons": reasons, "limits": None if limits is None else limits.model_dump(exclude_none=True)}


def f16_check(numbers: dict[str, Any], margins: list[float | None], tie: float) -> dict[str, Any]:
    """f16 reproduces the merged model: training's prompt tokens, and the same greedy answers except where the
    two part at a near-tie (transformers' own token ahead by at most `tie` nats: f16 rounding, not a bug)."""
    wide = [m for m in margins if m is not None and m > tie]
    return {"passed": numbers["template_tokens_equal"] == 1.0 and not wide,
            "near_tie_divergences": sum(m is not None and m <= tie for m in margins), "tie_margin": tie,
            "divergence_margins": [None if m is None else round(m, 6) for m in margins],
            "template_tokens_equal": numbers["template_tokens_equal"], "greedy_agreement": numbers["greedy_agreement"],
            "greedy_first_divergence": numbers["greedy_first_divergence"], "template_first_mismatch": numbers["template_first_mismatch"]}


def gguf_answers(tokenizer: Any, texts: list[str]) -> list[str]:
    """llama.cpp's greedy texts as the re-evaluation reads answers (a reasoning family's think block dropped)."""
    end = reasoning_end(tokenizer)
    return [final_answer(t, end) for t in texts]


def context_length(model: Any) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(getattr(config, "text_config", None), "max_position_embeddings", 2048))


def export_gguf(*, tools: Any, run: str, merged: Any, merged_dir: Path, tokenizer: Any, config: ExportConfig, data: RunData,
                dest: Path, scratch: Path, adapter_dir: Path | None, base_model: str | None, system_prompt: str | None,
                score: Any, logger: Any) -> dict[str, Any]:
    """Every GGUF of one run, written under `dest` and checked; their numbers. `score(answers)` is the
    re-evaluation's task metric of the run's held-out prompts."""
    settings = config.gguf
    # the view keeps the merged directory's name: the converter names the model (general.name) after it
    merged_dir = converter_input(merged_dir, tokenizer, base_model, scratch / "converter-input" / merged_dir.name)
    refusal = lcpp.converter_refusal(merged_dir)
    if refusal:
        raise StageFailed(f"export: run {run}: target gguf: {refusal}")
    nthreads = threads(settings)
    probe = make_probe(tokenizer, merged, data, settings, config.reeval.max_new_tokens)
    reference = reference_side(merged, probe)
    pre = settings.pre_tokenizer
    f16_path = (dest if F16 in settings.types else scratch) / f"model-{F16}.gguf"
    logger.info("export: %s → gguf f16", run)
    lcpp.convert_model(tools, merged_dir, f16_path, F16, pre)

    out: dict[str, Any] = {"types": {}, "files": {}}
    imatrix = None
    if settings.imatrix.enabled and any(t in lcpp.IMATRIX_TYPES for t in settings.types):
        imatrix, out["imatrix"] = make_imatrix(tools, tokenizer, data, f16_path, dest / "imatrix.gguf", settings, nthreads)
        out["files"]["imatrix"] = imatrix.name

    merged_f16: tuple[dict[str, Any], list[Any]] | None = None
    for gtype in [F16] + [t for t in settings.types if t != F16]:
        if gtype == F16:
            path = f16_path
        elif gtype in ("f32", "bf16"):
            path = lcpp.convert_model(tools, merged_dir, dest / f"model-{gtype}.gguf", gtype, pre)
        else:
            logger.info("export: %s → gguf %s", run, gtype)
            uses = imatrix if gtype in lcpp.IMATRIX_TYPES else None
            path = lcpp.quantize(tools, f16_path, dest / f"model-{gtype}.gguf", gtype, imatrix=uses, threads=nthreads)
        answer, logprobs = gguf_side(tools, path, probe, scratch / "logits")
        if gtype == F16:
            merged_f16 = (answer, logprobs)
        numbers = compare(probe, reference, answer, logprobs)
        numbers["task_scores"] = score(gguf_answers(tokenizer, answer["generated"]["texts"]))
        numbers["size_mb"] = round(path.stat().st_size / 2**20, 3)
        numbers["imatrix"] = gtype in lcpp.IMATRIX_TYPES and imatrix is not None
        if gtype == F16:
            numbers["check"] = checks.require(
                "gguf_f16_matches_merged",
                f16_check(numbers, divergence_margins(merged, probe, reference, answer["generated"]["ids"]), settings.f16_tie_margin),
                f"export: run {run}: the f16 GGUF does not reproduce the merged model (prompt tokens from its embedded chat "
                f"template equal training's on {numbers['template_tokens_equal']:.0%} of the held-out prompts, identical greedy "
                f"answers on {numbers['greedy_agreement']:.0%}; first divergences {numbers['greedy_first_divergence']}, not at "
                f"near-ties): a "
                "converter or chat-template bug, so no GGUF of it is published",
            )
        else:
            numbers["limits"] = limit_verdict(numbers, settings.limits.get(gtype))
            if settings.fail_on_limits and not numbers["limits"]["passed"]:
                raise StageFailed(f"export: run {run}: GGUF {gtype} is over its limits: {'; '.join(numbers['limits']['reasons'])} "
                                  "(export.gguf.limits; set fail_on_limits: false to only report)")
        numbers.pop("template_first_mismatch", None)
        if gtype in settings.types:
            out["types"][gtype] = numbers
            out["files"][gtype] = path.name
    if settings.lora and adapter_dir is not None and base_model is not None and merged_f16 is not None:
        out["lora"] = export_lora(tools, run, adapter_dir, Path(base_model), dest, probe, reference, merged_f16, pre, scratch)
        if out["lora"].get("file"):
            out["files"]["lora"] = out["lora"]["file"]
            out["files"]["lora_base"] = out["lora"]["base_file"]
    if settings.modelfile:
        out["modelfile"] = write_modelfiles(tokenizer, merged, probe, out["files"], settings.types, dest, system_prompt)
    return out


def converter_input(merged_dir: Path, tokenizer: Any, base_model: str | None, view: Path) -> Path:
    """The directory llama.cpp's converter reads. The converters of some families (Gemma 2, Phi-3) read nothing but
    the sentencepiece tokenizer.model their checkpoints ship, and the special tokens from tokenizer_config.json's
    `added_tokens_decoder`; transformers 5 saves a fine-tune's tokenizer without either. For those, a view of the
    merged directory (links) with the model's own tokenizer.model, else the base model's when its vocabulary is
    the fine-tune's, and the fine-tune's special tokens written where the converter reads them. Otherwise the
    merged directory itself (`converter_refusal` then says what is missing)."""
    if sentencepiece_family(merged_dir) is None:
        return merged_dir
    sentencepiece = merged_dir / "tokenizer.model"
    if not sentencepiece.is_file():
        base = Path(base_model) / "tokenizer.model" if base_model else None
        if base is None or not base.is_file() or not same_vocabulary(tokenizer, base.parent):
            return merged_dir
        sentencepiece = base
    view.mkdir(parents=True, exist_ok=True)
    for item in merged_dir.iterdir():
        if item.name not in ("tokenizer_config.json", "tokenizer.model") and not (view / item.name).exists():
            (view / item.name).symlink_to(item.resolve())
    if not (view / "tokenizer.model").exists():
        (view / "tokenizer.model").symlink_to(sentencepiece.resolve())
    write_added_tokens(merged_dir / "tokenizer_config.json", tokenizer, view / "tokenizer_config.json")
    return view


def write_added_tokens(source: Path, tokenizer: Any, dest: Path) -> None:
    """tokenizer_config.json with `added_tokens_decoder`, where the sentencepiece converter learns which pieces are
    special (control) tokens: transformers 5 keeps that list in tokenizer.json only, and without it the converter
    types Gemma's `<start_of_turn>` a normal piece that llama.cpp then spells out letter by letter."""
    config = json.loads(source.read_text()) if source.is_file() else {}
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "special": bool(t.special), "lstrip": t.lstrip, "rstrip": t.rstrip,
                 "normalized": t.normalized, "single_word": t.single_word}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    dest.write_text(json.dumps(config, indent=2))


def same_vocabulary(tokenizer: Any, base: Path) -> bool:
    """Whether the base model's tokenizer maps every token to the same id as the fine-tune's (no tokens added)."""
    try:
        return load_tokenizer(str(base)).get_vocab() == tokenizer.get_vocab()
    except (OSError, ValueError):
        return False


def make_imatrix(tools: Any, tokenizer: Any, data: RunData, f16: Path, dest: Path, settings: GGUFSettings, nthreads: int) -> tuple[Path, dict[str, Any]]:
    text = imatrix_text(tokenizer, data)
    tokens = len(encode_text(tokenizer, text)["input_ids"])
    context = min(settings.imatrix.context, tokens // 2)
    if context < 16:
        raise StageFailed(f"export: the run's training and validation text holds {tokens} tokens: too little for an importance "
                          "matrix (at least 32); add data, or set export.gguf.imatrix.enabled: false")
    info = compute_imatrix(tools, f16, text, dest, context=context, chunks=settings.imatrix.chunks, threads=nthreads)
    info.update({"source": "the run's own training + validation conversations, rendered with the chat template",
                 "records": len(data.imatrix_records), "text_tokens": tokens, "sha256": sha256(dest)})
    return dest, info


def write_modelfiles(tokenizer: Any, model: Any, probe: Any, files: dict[str, str], types: list[str], dest: Path,
                     system_prompt: str | None) -> dict[str, Any]:
    """One Ollama Modelfile per published type, and the check that its TEMPLATE replays training's rendering of
    the held-out prompts (with and without the system prompt)."""
    template = resolve_chat_template("model", tokenizer)
    jinja = lambda messages: render_messages(tokenizer, template, messages, True)  # noqa: E731
    pieces = template_pieces(jinja)
    stops = tokenizer.convert_ids_to_tokens(probe.stop_ids)
    num_ctx = context_length(model)
    same = 0
    for chat in probe.chats:
        system = chat[0]["content"] if chat and chat[0]["role"] == "system" else None
        turns = chat[1:] if system is not None else chat
        same += render(pieces, system if pieces.head_system is not None else None, turns) == jinja(chat)
    written = {}
    for gtype in types:
        name = f"Modelfile.{gtype}"
        (dest / name).write_text(modelfile(gguf_name=files[gtype], pieces=pieces, stops=stops, system_prompt=system_prompt, num_ctx=num_ctx))
        written[gtype] = name
    if "lora" in files:  # the adapter on its base, as llama.cpp's --lora runs it
        (dest / "Modelfile.lora").write_text(modelfile(gguf_name=files["lora_base"], adapter=files["lora"], pieces=pieces, stops=stops,
                                                       system_prompt=system_prompt, num_ctx=num_ctx))
        written["lora"] = "Modelfile.lora"
    return {"files": written, "stop": stops, "num_ctx": num_ctx, "system_prompt": system_prompt,
            "system_supported": pieces.head_system is not None,
            "template_matches_training": round(same / len(probe.chats), 4) if probe.chats else 1.0}


def export_lora(tools: Any, run: str, adapter_dir: Path, base_dir: Path, dest: Path, probe: Any, reference: Any,
                merged_f16: tuple[dict[str, Any], list[Any]], pre: str | None, scratch: Path) -> dict[str, Any]:
    """The adapter as a GGUF LoRA on the base's f16 GGUF, checked against the merged f16 GGUF in llama.cpp."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    why_not = lora_refusal(cfg, base_dir)
    if why_not:
        return {"file": None, "skipped": why_not}
    lora = lcpp.convert_lora(tools, adapter_dir, base_dir, dest / f"lora-{run}.gguf", pre)
    base = lcpp.convert_model(tools, base_dir, dest / "base-f16.gguf", F16, pre)
    answer, logprobs = gguf_side(tools, base, probe, scratch / "logits", lora=lora)
    merged_answer, merged_logprobs = merged_f16
    against_merged = sum(first_divergence(a, b) is None for a, b in zip(answer["generated"]["ids"], merged_answer["generated"]["ids"]))
    top1, _, _ = top1_and_kl(merged_logprobs, logprobs, probe.text_ids)
    numbers = compare(probe, reference, answer, logprobs)
    numbers.pop("template_first_mismatch", None)
    return {
        "file": lora.name, "base_file": base.name, "size_mb": round(lora.stat().st_size / 2**20, 3),
        "greedy_agreement_with_merged_gguf": round(against_merged / max(len(probe.prompt_ids), 1), 4),
        "top1_agreement_with_merged_gguf": round(top1, 4),
        "against_merged_model": numbers,
    }


def lora_refusal(cfg: dict[str, Any], base_dir: Path) -> str | None:
    """Why convert_lora_to_gguf.py cannot take this adapter (None when it can)."""
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        return f"a {cfg.get('peft_type')} adapter: llama.cpp loads LoRA adapters only"
    if cfg.get("use_dora"):
        return "DoRA: llama.cpp has no DoRA"
    if cfg.get("modules_to_save"):
        return f"modules_to_save {cfg['modules_to_save']}: a GGUF LoRA holds low-rank updates only"
    if not (base_dir / "config.json").is_file():
        return f"the base {base_dir} is not a local model directory"

    return converter_refusal(base_dir)
