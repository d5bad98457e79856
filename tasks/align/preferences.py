"""On-policy preference pairs: sample `k` completions per train prompt from the SFT policy, score
them with the reward model, a rule against the reference answer, or an AI judge (RLAIF:
tasks/lm/judge.py, every two samples compared), and pair the best with the worst. Prompts whose samples all score the same give no preference and are skipped (counted).

The pairs have the data artifact's preference-record shape (plus `prompt_messages`, `scores`),
and the stage writes them into its artifact as `preferences.on_policy.jsonl`: a data artifact
like any other, which a later run can read back as a `format: preference` source.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from tunepipe.schemas.align import PreferencesConfig
from tunepipe.tasks.align.rewards import RULES
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.encoding import final_answer, reasoning_end, stop_token_ids
from tunepipe.tasks.lm.pairs import render_conversation, render_prompt
from tunepipe.tasks.lm.reward_model import score_texts


def sample_completions(model: Any, tokenizer: Any, prompt: str, settings: PreferencesConfig) -> list[str]:
    """`k` sampled completions of one rendered prompt, after the greedy one with `include_greedy`."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    common = {
        "max_new_tokens": settings.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": stop_token_ids(tokenizer, model.generation_config),
    }
    outputs = []
    with torch.no_grad():
        if settings.include_greedy:
            outputs.append(model.generate(**batch, do_sample=False, **common))
        outputs.append(model.generate(
            **batch, do_sample=True, temperature=settings.temperature, top_k=0, top_p=1.0, num_return_sequences=settings.k, **common,
        ))
    width = batch["input_ids"].shape[1]
    end = reasoning_end(tokenizer)
    return [final_answer(t, end) for out in outputs for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


def rank(samples: list[str], scores: list[float], min_margin: float) -> tuple[int, int] | str:
    """(best, worst) indices among the distinct samples, or why this prompt gives no pair:
    `identical` (every sample the same text), `tie` (all distinct samples scored the same) or
    `below_margin` (best and worst within `min_margin`). Ties at the top or bottom are broken by
    sample order (the first sampled wins), so the choice is reproducible."""
    seen: dict[str, int] = {}
    for i, text in enumerate(samples):
        seen.setdefault(text, i)
    candidates = sorted(seen.values())
    if len(candidates) < 2:
        return "identical"
    best = max(candidates, key=lambda i: (scores[i], -i))
    worst = min(candidates, key=lambda i: (scores[i], i))
    if scores[best] == scores[worst]:
        return "tie"
    if scores[best] - scores[worst] <= min_margin:
        return "below_margin"
    return best, worst


def empty_counts() -> dict[str, Any]:
    return {"prompts": 0, "samples": 0, "distinct": 0, "identical": 0, "ties": 0, "below_margin": 0, "pairs": 0, "tied_scores": {}}


def on_policy_pairs(
    model: Any, tokenizer: Any, prompts: list[dict[str, Any]], settings: PreferencesConfig, reward: tuple[Any, Any] | None, seed: int,
    judge: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(pairs, counts): best-vs-worst pairs of the policy's own samples; the counts per task say
    what happened to every prompt (what `require_pairs` reports when no pair came out)."""
    import torch

    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    pairs: list[dict[str, Any]] = []
    per_task: dict[str, dict[str, Any]] = {}
    for record in prompts[: settings.max_prompts]:
        counts = per_task.setdefault(record["task"], empty_counts())
        samples = sample_completions(model, tokenizer, render_prompt(tokenizer, record["prompt"]), settings)
        scores = score_samples(record, samples, settings, reward, judge)
        counts["prompts"] += 1
        counts["samples"] += len(samples)
        counts["distinct"] += len(set(samples))
        ranked = rank(samples, scores, settings.min_margin)
        if isinstance(ranked, str):
            counts["ties" if ranked == "tie" else ranked] += 1
            if ranked == "tie":
                tied = f"{scores[0]:.3g}"
                counts["tied_scores"][tied] = counts["tied_scores"].get(tied, 0) + 1
            continue
        best, worst = ranked
        counts["pairs"] += 1
        user = [m["content"] for m in record["prompt"] if m["role"] == "user"][-1]
        pairs.append(
            {
                "id": hashlib.sha256(f"{user}\x00{samples[best]}\x00{samples[worst]}".encode()).hexdigest()[:16],
                "task": record["task"], "prompt": user, "prompt_messages": record["prompt"],
                "chosen": samples[best], "rejected": samples[worst], "split": "train", "source": "on_policy",
                "scores": [round(scores[best], 4), round(scores[worst], 4)],
            }
        )
    model.train(was_training)
    total = {k: sum(c[k] for c in per_task.values()) for k in ("prompts", "samples", "distinct", "ties", "pairs")}
    return pairs, {**total, "no_preference": total["prompts"] - total["pairs"], "per_task": per_task}


def score_samples(record: dict[str, Any], samples: list[str], settings: PreferencesConfig, reward: Any, judge: Any) -> list[float]:
    """Each sample's score by `settings.scorer`."""
    if settings.scorer == "reward_model":
        assert reward is not None, "the stage checks that a reward input exists"
        rm, rm_tokenizer = reward
        return score_texts(rm, rm_tokenizer, [render_conversation(rm_tokenizer, record["prompt"], s) for s in samples])
    if settings.scorer == "judge":
        assert judge is not None, "the config requires a judge section for this scorer"
        # RLAIF: every two samples compared by the AI judge (both orders); score = share won.
        return judge.tournament(record["prompt"], record["reference"], samples)
    return [RULES[settings.rule](s, record["reference"]) for s in samples]


def require_pairs(run: str, config: Any, counts: dict[str, Any]) -> None:
    """StageFailed naming the run's tasks, their counts and what to change, when no pair came out;
    a task without pairs next to tasks with pairs is logged (its prompts are not aligned)."""
    settings = config.preferences
    scorer = f"rule {settings.rule}" if settings.scorer == "rule" else settings.scorer
    lines = {
        task: (
            f"{task}: {c['prompts']} prompts, {c['samples']} samples ({c['distinct']} distinct), "
            f"{c['identical']} with identical samples, {c['ties']} ties"
            + (f" (at score {', '.join(f'{s}: {n}' for s, n in sorted(c['tied_scores'].items()))})" if c["tied_scores"] else "")
            + (f", {c['below_margin']} within min_margin {settings.min_margin}" if c["below_margin"] else "")
            + f", {c['pairs']} pairs"
        )
        for task, c in counts["per_task"].items()
    }
    empty = [task for task, c in counts["per_task"].items() if not c["pairs"]]
    if empty and len(empty) < len(lines):
        logging.getLogger("tunepipe.align").warning(
            "align (%s): on-policy sampling gave no pair for %s: %s", run, ", ".join(empty), "; ".join(lines[t] for t in empty)
        )
    if counts["pairs"]:
        return
    all_tied_low = all(set(c["tied_scores"]) <= {"0"} for c in counts["per_task"].values())
    advice = (
        f"the policy's samples at temperature {settings.temperature} all earn the same score from {scorer} "
        + ("(0: too weak to ever hit the reference). " if all_tied_low else ". ")
        + f"Lower preferences.temperature (a weak SFT policy's mode is often right while its samples are not), keep "
        f"preferences.include_greedy on, raise preferences.k ({settings.k}), train SFT longer, or use a finer scorer "
        "(rule token_f1, reward_model)"
    )
    raise StageFailed(f"align ({run}): on-policy sampling gave no preference pair: {'; '.join(lines.values())}. {advice}")
