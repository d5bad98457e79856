"""Does SFT learn? Greedy answers on the held-out test split, trained model against its base.

The same prompts (the chat template's rendering up to the last assistant turn) go to the
untrained base and to each trained adapter or model; the answers are scored against the
reference by exact match and token F1 (both on whitespace-normalised text). The evaluate stage
(issue 5) does the full comparison; this is the stage's own learning signal, recorded in its
metrics so a run that learned nothing is visible at once.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from schemas.environment import EnvironmentProfile
from schemas.sft import SFTConfig
from tasks.sft.data import _render, read_split, record_messages, resolve_chat_template


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over whitespace tokens."""
    pred, ref = normalise(prediction).split(), normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    return {
        "exact_match": round(sum(map(exact_match, predictions, references)) / n, 4) if n else 0.0,
        "token_f1": round(sum(map(token_f1, predictions, references)) / n, 4) if n else 0.0,
        "n": n,
    }


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
        prompts.append(_render(tokenizer, template, messages[:last], True))
        references.append(messages[last]["content"])
    return prompts, references


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions, batched with left padding; the rendered prompt already holds any BOS."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def heldout_metrics(
    config: SFTConfig, outputs: dict[str, Any], artifact_dir: Path, model_path: str, data_dir: str, env: EnvironmentProfile, tasks: list[str]
) -> dict[str, dict[str, Any]]:
    """{task: {exact_match, token_f1, base_exact_match, base_token_f1, n}} on the test split."""
    from peft import PeftModel

    from tasks.modeling import load_model, load_tokenizer
    from tasks.sft.train import load_base

    settings = config.heldout
    examples = heldout_examples(data_dir, tasks, settings.max_examples_per_task)
    if not examples:
        return {}
    generate = lambda model, tok, prompts: greedy_answers(model, tok, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)

    run_tasks = {run: ([run] if outputs["kind"] == "adapters" else list(examples)) for run in outputs["paths"]}
    base = load_base(model_path, config.method, env, config.revision).eval()
    if getattr(base, "quantization_method", None) is None:  # a 4-bit base is already on its GPU
        base = base.to(env.device)
    base.config.use_cache = True
    results: dict[str, dict[str, Any]] = {}
    trained_with_adapters = None
    for run, save_to in outputs["paths"].items():
        trained_dir = artifact_dir / save_to
        tokenizer = load_tokenizer(str(trained_dir))
        template = resolve_chat_template(config.chat_template, tokenizer)
        if outputs["kind"] == "model":
            trained = load_model(str(trained_dir), dtype=env.dtype, device_map={"": env.device}).eval()
        elif trained_with_adapters is None:
            trained = trained_with_adapters = PeftModel.from_pretrained(base, str(trained_dir), adapter_name=run).eval()
        else:
            trained_with_adapters.load_adapter(str(trained_dir), adapter_name=run)
            trained_with_adapters.set_adapter(run)
            trained = trained_with_adapters
        for task in run_tasks[run]:
            if task not in examples:
                continue
            prompts, references = prompts_and_references(examples[task], tokenizer, template, config.system_prompt)
            if outputs["kind"] == "model":
                base_answers = generate(base, tokenizer, prompts)
            else:
                with trained.disable_adapter():  # the reference is the same weights with the adapter off
                    base_answers = generate(trained, tokenizer, prompts)
            trained_scores = score(generate(trained, tokenizer, prompts), references)
            base_scores = score(base_answers, references)
            results[task] = {
                **trained_scores,
                "base_exact_match": base_scores["exact_match"],
                "base_token_f1": base_scores["token_f1"],
            }
    return results
