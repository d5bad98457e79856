"""Does SFT learn? Greedy answers on the held-out test split, trained model against its base.

The same prompts (the chat template's rendering up to the last assistant turn) go to the
untrained base and to each trained adapter or model; the answers are scored against the
reference by exact match and token F1 (normalised as `sft.scoring` says: SQuAD-style by default). The evaluate stage
(issue 5) does the full comparison; this is the stage's own learning signal, recorded in its
metrics so a run that learned nothing is visible at once.
"""


from __future__ import annotations

from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.handoffs import ModelOutputs
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.lm.encoding import resolve_chat_template
from tunepipe.tasks.lm.generation import (
    greedy_answers,
    heldout_examples,
    prompts_and_references,
)
from tunepipe.tasks.lm import retention
from tunepipe.tasks.lm.modeling import load_model, load_tokenizer
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.lm.scoring import task_scorers
from tunepipe.tasks.training.trainer import load_base


def heldout_metrics(
    config: SFTConfig, outputs: ModelOutputs, artifact_dir: Path, model_path: str, data_dir: str, env: EnvironmentProfile, tasks: list[str],
    general: bool = False,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """({task: {exact_match, token_f1, base_exact_match, base_token_f1, n}} on the test split,
    {run: retention on the general set, base → trained} when `general`)."""
    from peft import PeftModel

    settings = config.heldout
    examples = heldout_examples(data_dir, tasks, settings.max_examples_per_task)
    if not examples and not general:
        return {}, {}
    generate = lambda model, tok, prompts: greedy_answers(model, tok, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)

    scorers = task_scorers(config.scoring, data_dir, list(examples))
    run_tasks = {run: ([run] if outputs.kind == "adapters" else list(examples)) for run in outputs.paths}
    base = load_base(model_path, config.method, env, config.revision).eval()
    if getattr(base, "quantization_method", None) is None:  # a 4-bit base is already on its GPU
        base = base.to(hardware(env).device)
    base.config.use_cache = True
    results: dict[str, dict[str, Any]] = {}
    kept: dict[str, dict[str, Any]] = {}
    trained_with_adapters = None
    for run, save_to in outputs.paths.items():
        trained_dir = artifact_dir / save_to
        tokenizer = load_tokenizer(str(trained_dir))
        template = resolve_chat_template(config.chat_template, tokenizer)
        if outputs.kind == "model":
            trained = load_model(str(trained_dir), dtype=hardware(env).dtype, device_map=hardware(env).device_map()).eval()
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
            if outputs.kind == "model":
                base_answers = generate(base, tokenizer, prompts)
            else:
                with trained.disable_adapter():  # the reference is the same weights with the adapter off
                    base_answers = generate(trained, tokenizer, prompts)
            trained_scores = scorers[task].score(generate(trained, tokenizer, prompts), references)
            base_scores = scorers[task].score(base_answers, references)
            results[task] = {
                **trained_scores,
                "base_exact_match": base_scores["exact_match"],
                "base_token_f1": base_scores["token_f1"],
            }
        if general:
            questions = retention.prompts(tokenizer, template, config.system_prompt)
            ask = lambda model: greedy_answers(model, tokenizer, questions, max_new_tokens=retention.MAX_NEW_TOKENS, batch_size=settings.batch_size)
            if outputs.kind == "model":
                before = ask(base)
            else:
                with trained.disable_adapter():
                    before = ask(trained)
            if any(retention.scores(before)):  # a base that answers none of it has nothing to lose
                kept[run] = retention.retention(before, ask(trained), ("base", "trained"))
    return results, kept
