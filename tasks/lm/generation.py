"""Answers on held-out prompts: the test records of each task, their prompts rendered by the chat
template up to the last assistant turn, and batched greedy decoding (or seeded sampling).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from tunepipe.tasks.core.tracking import current_stage_name
from tunepipe.tasks.lm.encoding import (
    read_split,
    record_messages,
    encode_text,
    final_answer,
    reasoning_end,
    render_messages,
    stop_token_ids,
)


def heldout_examples(data_dir: str | Path, tasks: list[str], per_task: int) -> dict[str, list[dict[str, Any]]]:
    """The first `per_task` test records of each task (the split's order is deterministic)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in read_split(data_dir, "test"):
        task = str(record.get("task") or "default")
        if task in tasks and len(by_task[task]) < per_task:
            by_task[task].append(record)
    return dict(by_task)


def prompts_and_references(records: list[dict[str, Any]], tokenizer: Any, template: str, system_prompt: str | None) -> tuple[list[str], list[str]]:
    prompts, references = [], []
    for record in records:
        messages = record_messages(record, system_prompt)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(render_messages(tokenizer, template, messages[:last], True))
        references.append(messages[last]["content"])
    return prompts, references


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions, batched with left padding; the rendered prompt already holds any BOS.
    Generation stops on any of the model's stop tokens (eos and the template's end of turn). A
    reasoning family's think block is not part of the answer (`final_answer`)."""
    texts = _generated_texts(model, tokenizer, prompts, batch_size, do_sample=False, max_new_tokens=max_new_tokens)
    answers: list[str] = []
    with _generation_bar(len(prompts), batch_size) as bar:
        for batch in texts:
            answers.extend(batch)
            bar.update(len(batch))
    return answers


def _generation_bar(total: int, batch_size: int) -> Any:
    """A console progress line while a stage generates more than one batch (evaluate's candidate and
    baseline answers, held-out checks), gone when done; labelled with the running stage."""
    from tqdm.auto import tqdm

    label = f"{current_stage_name() or 'generation'}: generating"
    return tqdm(total=total, desc=label, unit="prompt", leave=False, mininterval=1.0, file=sys.stderr, disable=total <= batch_size)


def sampled_answers(
    model: Any, tokenizer: Any, prompts: list[str], *, samples: int, temperature: float, max_new_tokens: int, batch_size: int, seed: int,
) -> list[list[str]]:
    """`samples` completions of each prompt at `temperature` (no top-k/top-p cut, as TRL's GRPO and
    RLOO sample), batched as greedy_answers batches. The draws are seeded from `seed` alone, in a forked
    RNG (the process's own stream is left as it was), so two policies sampled with the same seed see the
    same random numbers: their difference is the policies', not the draw's."""
    import torch

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        texts = list(_generated_texts(
            model, tokenizer, prompts, batch_size, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            num_return_sequences=samples, max_new_tokens=max_new_tokens,
        ))
    flat = [answer for batch in texts for answer in batch]
    return [flat[i : i + samples] for i in range(0, len(flat), samples)]


def _generated_texts(model: Any, tokenizer: Any, prompts: list[str], batch_size: int, **generate: Any) -> Iterator[list[str]]:
    """The answers `model.generate(**generate)` gives to each batch of rendered prompts (left padding, no
    special tokens added, stopping on any stop token; `num_return_sequences` answers per prompt, in order)."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    end = reasoning_end(tokenizer)  # a reasoning family's answer follows its think block
    for start in range(0, len(prompts), batch_size):
        ids = [list(encode_text(tokenizer, p)["input_ids"]) for p in prompts[start : start + batch_size]]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops, **generate)
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        yield [final_answer(t, end) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
