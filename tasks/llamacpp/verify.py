"""A GGUF checked against the transformers model it came from, on the run's own held-out data.

- template: the GGUF's embedded chat template, rendered and tokenized as llama.cpp's chat endpoint does, gives
  the same token ids as training's rendering (`render_messages` + `encode_text`) of every held-out prompt;
- greedy: llama.cpp's greedy continuation of training's prompt ids against transformers' (batch 1, no padding):
  prompts answered identically, the first diverging token of each, the share of tokens before it;
- next-token distributions on validation conversations: top-1 agreement and mean KL(transformers ‖ GGUF) over
  the distinct contexts (`distinct_positions`: a prefix every conversation shares, such as the template's system
  header, is one measurement, not one per conversation), perplexity of both and their ratio over every token.

The transformers side runs once per model (`reference_side`), every GGUF type is compared against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepipe.tasks.llamacpp.env import LlamaCppTools
from tunepipe.tasks.llamacpp.gguf import run_worker


@dataclass
class Probe:
    """What every GGUF of one model is checked on."""

    chats: list[list[dict[str, str]]]  # held-out conversations up to the answer
    prompt_ids: list[list[int]]  # training's token ids of those prompts
    text_ids: list[list[int]]  # validation conversations, whole, truncated
    stop_ids: list[int]
    max_new_tokens: int
    n_ctx: int = 2048
    threads: int = 1


@dataclass
class Reference:
    """The transformers model's answers to a probe."""

    greedy: list[list[int]]
    logprobs: list[Any] = field(repr=False)  # per text: [len-1, vocab] float32 log-probabilities of the next token


def reference_side(model: Any, probe: Probe) -> Reference:
    import torch

    device = next(model.parameters()).device
    greedy = []
    with torch.no_grad():
        for ids in probe.prompt_ids:
            greedy.append(_hf_greedy(model, torch.tensor([ids], device=device), probe.max_new_tokens, set(probe.stop_ids)))
        logprobs = [torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float().cpu(), -1)
                    for ids in probe.text_ids]
    return Reference(greedy=greedy, logprobs=logprobs)


def _hf_greedy(model: Any, ids: Any, max_new_tokens: int, stops: set[int]) -> list[int]:
    """Argmax decoding with the KV cache, stopping before a stop token (as the llama.cpp side does)."""
    import torch

    out, past, step = [], None, ids
    for _ in range(max_new_tokens):
        result = model(input_ids=step, past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(torch.argmax(result.logits[0, -1].float()))
        if token in stops:
            break
        out.append(token)
        step = torch.tensor([[token]], device=ids.device)
    return out


def gguf_side(tools: LlamaCppTools, model: Path, probe: Probe, work: Path, lora: Path | None = None) -> tuple[dict[str, Any], list[Any]]:
    """llama.cpp's answers to the probe: the worker's JSON, and per text the next-token log-probabilities."""
    import numpy as np
    import torch

    logits_file = work / f"{model.stem}{'-lora' if lora else ''}.logits.npz"
    work.mkdir(parents=True, exist_ok=True)
    answer = run_worker(tools, {
        "model": str(model), "lora": str(lora) if lora else None, "n_ctx": probe.n_ctx, "threads": probe.threads,
        "chats": probe.chats,
        "generate": {"prompts": probe.prompt_ids, "max_new_tokens": probe.max_new_tokens, "stop_ids": probe.stop_ids},
        "score": probe.text_ids, "logits_file": str(logits_file),
    })
    with np.load(logits_file) as arrays:
        logprobs = [torch.log_softmax(torch.from_numpy(arrays[f"t{i}"][:-1]), -1) for i in range(len(probe.text_ids))]
    logits_file.unlink()
    return answer, logprobs


def divergence_margins(model: Any, probe: Probe, reference: Reference, generated: list[list[int]]) -> list[float | None]:
    """Per prompt, at the first token where llama.cpp's greedy answer leaves transformers': how much more
    log-probability transformers gave its own token than llama.cpp's (None where they agree). A margin near zero
    is a near-tie that weight rounding may flip (common in untrained models); a wide one is a real difference."""
    import torch

    margins: list[float | None] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for prompt, ref, got in zip(probe.prompt_ids, reference.greedy, generated):
            d = first_divergence(got, ref)
            if d is None or d >= len(ref) or d >= len(got):
                margins.append(None if d is None else float("inf"))  # one stopped early: no tie to measure
                continue
            logits = model(input_ids=torch.tensor([prompt + ref[:d]], device=device)).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, -1)
            margins.append(float(logprobs[ref[d]] - logprobs[got[d]]))
    return margins


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter one's length when one is a prefix); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def distinct_positions(texts: list[list[int]]) -> list[list[int]]:
    """Per text, the positions (next-token predictions, 0..len-2) whose context ids[:p+1] no earlier position had.

    Both models are deterministic, so a context seen twice (the chat template's system header and the task's
    instruction open every validation conversation) gives the same two distributions twice: counting it per
    conversation would weigh one near-tie there as many times as there are conversations."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for ids in texts:
        keep = []
        for p in range(len(ids) - 1):
            context = tuple(ids[: p + 1])
            if context not in seen:
                seen.add(context)
                keep.append(p)
        out.append(keep)
    return out


def top1_and_kl(reference: list[Any], other: list[Any], texts: list[list[int]]) -> tuple[float, float, int]:
    """Top-1 agreement and mean KL(reference ‖ other) of the next-token distributions over the distinct contexts
    of `texts`, and their number."""
    import torch

    top1 = kl = 0.0
    count = 0
    for ref, got, keep in zip(reference, other, distinct_positions(texts)):
        vocab = min(ref.shape[-1], got.shape[-1])  # a GGUF may drop padding rows of the embedding
        index = torch.tensor(keep, dtype=torch.long)
        ref, got = ref[index, :vocab], got[index, :vocab]
        top1 += float((ref.argmax(-1) == got.argmax(-1)).sum())
        kl += float((ref.exp() * (ref - got)).sum(-1).sum())
        count += len(keep)
    return top1 / max(count, 1), kl / max(count, 1), count


def compare(probe: Probe, reference: Reference, answer: dict[str, Any], logprobs: list[Any]) -> dict[str, Any]:
    """The numbers of one GGUF against the transformers model."""
    import torch

    template_equal = [list(g) == list(t) for g, t in zip(answer["chat_ids"], probe.prompt_ids)]
    mismatch = next((i for i, ok in enumerate(template_equal) if not ok), None)
    generated = answer["generated"]["ids"]
    divergences = [first_divergence(g, r) for g, r in zip(generated, reference.greedy)]
    before = [len(r) if d is None else d for d, r in zip(divergences, reference.greedy)]
    top1, kl, contexts = top1_and_kl(reference.logprobs, logprobs, probe.text_ids)
    nll_ref = nll_gguf = positions = 0.0
    for ref, got, ids in zip(reference.logprobs, logprobs, probe.text_ids):
        vocab = min(ref.shape[-1], got.shape[-1])
        ref, got = ref[:, :vocab], got[:, :vocab]
        targets = torch.tensor(ids[1:])
        nll_ref += float(-ref.gather(-1, targets[:, None]).sum())
        nll_gguf += float(-got.gather(-1, targets[:, None]).sum())
        positions += len(ids) - 1
    positions = max(positions, 1)
    ppl_ref, ppl_gguf = float(torch.exp(torch.tensor(nll_ref / positions))), float(torch.exp(torch.tensor(nll_gguf / positions)))
    return {
        "template_tokens_equal": sum(template_equal) / len(template_equal) if template_equal else 1.0,
        "template_first_mismatch": None if mismatch is None else {
            "prompt": mismatch, "training": probe.prompt_ids[mismatch], "gguf": answer["chat_ids"][mismatch]},
        "greedy_agreement": round(sum(d is None for d in divergences) / len(divergences), 4) if divergences else 1.0,
        "greedy_first_divergence": divergences,
        # no reference tokens at all (every answer stopped at once, and so did llama.cpp's): nothing diverged
        "greedy_tokens_before_divergence": round(sum(before) / total, 4) if (total := sum(len(r) for r in reference.greedy)) else 1.0,
        "top1_agreement": round(top1, 4),
        "mean_kl": round(kl, 6),
        "distinct_contexts": contexts,  # what top-1 and KL are over
        "perplexity_reference": round(ppl_ref, 4),
        "perplexity": round(ppl_gguf, 4),
        "perplexity_ratio": round(ppl_gguf / ppl_ref, 4),
        "positions": int(positions),  # every scored token (perplexity)
        "tokens_per_second": round(answer["generated"]["tokens"] / answer["generated"]["seconds"], 2) if answer["generated"]["seconds"] else None,
    }
