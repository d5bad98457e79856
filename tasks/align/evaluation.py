"""Did alignment do what it should, and what did it cost? The aligned policy against the SFT policy.

- preference accuracy on held-out pairs: the share where the policy gives the chosen response a
  higher log-likelihood than the rejected one (SFT and aligned), and DPO's implicit-reward
  accuracy (aligned-vs-SFT log-ratio of chosen above that of rejected);
- the task metric (exact match / token F1 of greedy answers on the test split), SFT and aligned,
  and whether the drop stays within `align.task_tolerance`;
- KL(aligned || SFT) per token on the aligned policy's own held-out answers;
- with a reward model: the mean and spread of its score for each policy's answers, and the win
  rate of aligned over SFT (ties count half);
- grpo/rloo's rule rewards of the greedy answers, and their mean over seeded samples at the
  method's temperature (the expected reward those methods maximise).
"""

from __future__ import annotations

from typing import Any

from tunepipe.schemas.align import AlignConfig
from tunepipe.tasks.align.rewards import RULES
from tunepipe.tasks.lm import retention
from tunepipe.tasks.lm.generation import greedy_answers, sampled_answers
from tunepipe.tasks.lm.metrics import DEFAULT_SCORER, TaskScorer
from tunepipe.tasks.lm.pairs import (
    pair_prompt,
    render_conversation,
    render_prompt,
)
from tunepipe.tasks.lm.reward_model import score_texts


def response_logprobs(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], responses: list[str], batch_size: int) -> list[float]:
    """Sum of the response tokens' log-probabilities given the rendered prompt."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, response in zip(prompts[start : start + batch_size], responses[start : start + batch_size]):
            prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(render_conversation(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
            rows.append((full_ids, len(prompt_ids)))
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        for i, (ids, boundary) in enumerate(rows):
            out.append(float(logps[i, boundary - 1 : len(ids) - 1].sum()))
    return out


def preference_metrics(pair: Any, tokenizer: Any, pairs: list[dict[str, Any]], batch_size: int, beta: float | None) -> dict[str, Any]:
    """Held-out preference accuracy of the SFT and the aligned policy (and DPO's implicit reward)."""
    if not pairs:
        return {}
    prompts = [pair_prompt(p) for p in pairs]
    logps = {}
    for which in ("sft", "aligned"):
        with pair.use(which) as model:
            logps[which] = (
                response_logprobs(model, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size),
                response_logprobs(model, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size),
            )
    accuracy = {w: sum(c > r for c, r in zip(*logps[w])) / len(pairs) for w in logps}
    (sft_c, sft_r), (al_c, al_r) = logps["sft"], logps["aligned"]
    implicit = [(ac - sc) - (ar - sr) for ac, sc, ar, sr in zip(al_c, sft_c, al_r, sft_r)]
    metrics = {
        "n": len(pairs),
        "sft_accuracy": round(accuracy["sft"], 4),
        "aligned_accuracy": round(accuracy["aligned"], 4),
        "implicit_reward_accuracy": round(sum(m > 0 for m in implicit) / len(pairs), 4),
        "implicit_reward_margin": round((beta or 1.0) * sum(implicit) / len(pairs), 4),
    }
    return metrics


def token_kl(model_pair: Any, tokenizer: Any, prompts: list[str], answers: list[str], batch_size: int) -> float:
    """Mean per-token KL(aligned || SFT) over the answer tokens (full next-token distributions)."""
    import torch

    total, count = 0.0, 0
    device = next(model_pair.model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        texts = [p + a for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size])]
        starts = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts[start : start + batch_size]]
        tokenizer.padding_side = "right"
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        logits = {}
        for which in ("sft", "aligned"):
            with model_pair.use(which) as model, torch.no_grad():
                logits[which] = torch.log_softmax(model(**batch).logits.float(), dim=-1)
        kl = (logits["aligned"].exp() * (logits["aligned"] - logits["sft"])).sum(-1)  # [batch, positions]
        for i, s in enumerate(starts):
            # From the position that predicts the first answer token to the one after the answer
            # (which predicts the stop): an empty answer still compares the two stop decisions.
            end = int(batch["attention_mask"][i].sum())
            total += float(kl[i, s - 1 : end].sum())
            count += end - (s - 1)
    return round(total / count, 6) if count else 0.0


def mixed_scores(answers: list[str], examples: list[dict[str, Any]], scorers: dict[str, TaskScorer]) -> dict[str, float]:
    """Exact match and token F1 over examples of several tasks, each scored by its task's scorer."""
    n = len(examples)
    rows = [(scorers.get(e["task"], DEFAULT_SCORER), a, e["reference"]) for a, e in zip(answers, examples)]
    return {
        "exact_match": round(sum(s.exact_match(a, r) for s, a, r in rows) / n, 4) if n else 0.0,
        "token_f1": round(sum(s.token_f1(a, r) for s, a, r in rows) / n, 4) if n else 0.0,
        "n": n,
    }


def task_and_reward_metrics(
    model_pair: Any, tokenizer: Any, examples: list[dict[str, Any]], config: AlignConfig, reward: tuple[Any, Any] | None,
    scorers: dict[str, TaskScorer] | None = None,
) -> dict[str, Any]:
    """Task metric, KL and (with a reward model) reward and win rate on held-out prompts."""
    settings = config.heldout
    if not examples:
        return {}
    prompts = [render_prompt(tokenizer, e["prompt"]) for e in examples]
    references = [e["reference"] for e in examples]
    answers = {}
    for which in ("sft", "aligned"):
        with model_pair.use(which) as model:
            answers[which] = greedy_answers(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
    scores = {w: mixed_scores(answers[w], examples, scorers or {}) for w in answers}
    rules = [r for r in getattr(config.method, "rewards", []) if r in RULES]
    metric = config.task_metric
    drop = scores["sft"][metric] - scores["aligned"][metric]
    out: dict[str, Any] = {
        "n": len(examples),
        "task_metric": metric,
        "sft": scores["sft"],
        "aligned": scores["aligned"],
        "task_metric_drop": round(drop, 4),
        "task_metric_within_tolerance": drop <= config.task_tolerance,
        "kl_to_sft": token_kl(model_pair, tokenizer, prompts, answers["aligned"], settings.batch_size),
    }
    if rules:  # grpo/rloo's verifiable rewards on held-out prompts: what the run optimised
        out["rule_rewards"] = {
            name: {w: round(sum(map(RULES[name], answers[w], references)) / len(references), 4) for w in answers} for name in rules
        }
        if settings.samples_per_prompt:
            out["sampled_rule_rewards"] = sampled_rule_rewards(model_pair, tokenizer, prompts, references, config, rules)
    if reward is not None:
        rm, rm_tokenizer = reward
        rewards = {
            w: score_texts(rm, rm_tokenizer, [render_conversation(rm_tokenizer, e["prompt"], a) for e, a in zip(examples, answers[w])], settings.batch_size)
            for w in answers
        }
        for w, values in rewards.items():
            mean = sum(values) / len(values)
            out[f"{w}_reward_mean"] = round(mean, 4)
            out[f"{w}_reward_std"] = round((sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5, 4)
        wins = [1.0 if a > s else 0.5 if a == s else 0.0 for a, s in zip(rewards["aligned"], rewards["sft"])]
        out["win_rate"] = round(sum(wins) / len(wins), 4)
    out["examples"] = [
        {"prompt": p[-200:], "reference": r, "sft": s, "aligned": a}
        for p, r, s, a in list(zip(prompts, references, answers["sft"], answers["aligned"]))[:5]
    ]
    return out


def general_retention(model_pair: Any, tokenizer: Any, settings: Any) -> dict[str, Any] | None:
    """The general-knowledge set asked of the SFT and the aligned policy (tasks/lm/retention.py);
    None when the SFT policy answers none of it."""
    questions = [render_prompt(tokenizer, [{"role": "user", "content": item["prompt"]}]) for item in retention.general_set()]
    answers = {}
    for which in ("sft", "aligned"):
        with model_pair.use(which) as model:
            answers[which] = greedy_answers(model, tokenizer, questions, max_new_tokens=retention.MAX_NEW_TOKENS, batch_size=settings.batch_size)
        if which == "sft" and not any(retention.scores(answers[which])):
            return None  # the SFT policy answers none of it: nothing to lose
    return retention.retention(answers["sft"], answers["aligned"], ("sft", "aligned"))


def sampled_rule_rewards(
    model_pair: Any, tokenizer: Any, prompts: list[str], references: list[str], config: AlignConfig, rules: list[str]
) -> dict[str, Any]:
    """Each rule's mean reward over `heldout.samples_per_prompt` completions per prompt, sampled as the
    run sampled its rollouts (the method's temperature), for the SFT and the aligned policy; both
    policies draw from the same seeded stream."""
    settings, method = config.heldout, config.method
    means: dict[str, dict[str, float]] = {name: {} for name in rules}
    for which in ("sft", "aligned"):
        with model_pair.use(which) as model:
            groups = sampled_answers(
                model, tokenizer, prompts, samples=settings.samples_per_prompt, temperature=method.temperature,
                max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, seed=config.training.seed,
            )
        for name in rules:
            values = [RULES[name](answer, reference) for group, reference in zip(groups, references) for answer in group]
            means[name][which] = round(sum(values) / len(values), 4)
    return {**means, "sampling": {"samples_per_prompt": settings.samples_per_prompt, "temperature": method.temperature}}


def objective(config: AlignConfig, task: dict[str, Any], prefs: dict[str, Any]) -> tuple[str, float, float] | None:
    """(name, SFT value, aligned value) of what this method optimised, measured on held-out data:
    grpo/rloo's rule rewards (their weighted sum) or the reward model's score; ppo's reward model;
    for dpo/kto/orpo the reward model's score when there is one, else preference accuracy."""
    method = config.method
    rules = task.get("rule_rewards")
    names = list(getattr(method, "rewards", []))
    with_model = "reward_model" in names and "sft_reward_mean" in task
    if rules and ("reward_model" not in names or with_model):
        # The weighted sum the run optimised, rules and (where it was one of the rewards) the reward model alike:
        # the reward model's score alone would call a run better that traded the verifiable reward for it.
        weights = dict(zip(names, method.reward_weights or [1.0] * len(names)))
        total = {w: sum(weights[n] * v[w] for n, v in rules.items()) for w in ("sft", "aligned")}
        if with_model:
            total = {w: total[w] + weights["reward_model"] * task[f"{w}_reward_mean"] for w in total}
        parts = [*rules, *(["reward_model"] if with_model else [])]
        return f"held-out reward ({' + '.join(parts)})", round(total["sft"], 4), round(total["aligned"], 4)
    if "sft_reward_mean" in task:
        return "held-out reward-model score", task["sft_reward_mean"], task["aligned_reward_mean"]
    if config.trains_on_pairs() and prefs:
        return "held-out preference accuracy", prefs["sft_accuracy"], prefs["aligned_accuracy"]
    return None


def sampled_objective(config: AlignConfig, task: dict[str, Any]) -> dict[str, Any] | None:
    """The weighted sum of the rule rewards over sampled answers (`sampled_rule_rewards`), SFT and aligned;
    None when they were not measured. The reward model, where it was one of the rewards, is not in it."""
    sampled = task.get("sampled_rule_rewards")
    if not sampled:
        return None
    names = list(config.method.rewards)
    weights = dict(zip(names, config.method.reward_weights or [1.0] * len(names)))
    rules = [n for n in names if n in sampled]
    total = {w: round(sum(weights[n] * sampled[n][w] for n in rules), 4) for w in ("sft", "aligned")}
    temperature = sampled["sampling"]["temperature"]
    return {"objective": f"sampled reward ({' + '.join(rules)}, temperature {temperature})", **total}


def preference_fell(config: AlignConfig, prefs: dict[str, Any]) -> bool:
    """dpo/kto/orpo: the aligned policy's held-out preference accuracy fell from SFT's by more than
    `align.preference_tolerance` (what those methods train is that very preference)."""
    if not config.trains_on_pairs() or not prefs:
        return False
    return prefs["sft_accuracy"] - prefs["aligned_accuracy"] > config.preference_tolerance + 1e-12


def verdict(config: AlignConfig, task: dict[str, Any], prefs: dict[str, Any]) -> dict[str, Any]:
    """Is the aligned policy better than SFT? Only when its objective rose on held-out data, its
    task metric stayed within `align.task_tolerance`, and (dpo/kto/orpo) its own held-out preference
    accuracy did not fall beyond `align.preference_tolerance`: a reward that rises while the task
    metric or the preference the method trains falls is the reward model being gamed, not a better
    policy."""
    measured = objective(config, task, prefs)
    within = task.get("task_metric_within_tolerance")
    metric = config.task_metric
    out: dict[str, Any] = {"objective": None, "objective_improved": None, "task_metric_within_tolerance": within,
                           "preference_accuracy_fell": preference_fell(config, prefs),
                           "kl_to_sft": task.get("kl_to_sft"), "better_than_sft": False}
    if measured is None:
        out["reason"] = "not better: the objective was not measured on held-out data (align.heldout, a reward input)"
        return out
    name, before, after = measured
    out.update({"objective": name, "sft": before, "aligned": after, "objective_improved": after > before})
    sampled = sampled_objective(config, task)
    if sampled:
        out["sampled_objective"] = sampled
    task_change = f"{metric} {task['sft'][metric]} -> {task['aligned'][metric]}" if within is not None else None
    if after <= before:
        out["reason"] = f"not better: {name} did not rise ({before} -> {after})"
        if sampled and sampled["aligned"] > sampled["sft"]:
            out["reason"] += (
                f" on greedy answers; {sampled['objective']} rose ({sampled['sft']} -> {sampled['aligned']}): the run "
                "improved its samples, not its greedy answers"
            )
    elif within is None:
        out["reason"] = (
            f"not better: {name} rose ({before} -> {after}) but the task metric was not measured "
            "(align.heldout.max_examples_per_task 0): reward alone does not make a policy better"
        )
    elif not within:
        out["reason"] = (
            f"not better: {name} rose ({before} -> {after}) but {task_change} fell beyond align.task_tolerance "
            f"{config.task_tolerance}: the reward rose without the task (reward hacking?)"
        )
    elif preference_fell(config, prefs):
        out["reason"] = (
            f"not better: {name} rose ({before} -> {after}) but the policy's own held-out preference accuracy fell "
            f"({prefs['sft_accuracy']} -> {prefs['aligned_accuracy']}, beyond align.preference_tolerance "
            f"{config.preference_tolerance}): it prefers the chosen answers less often than SFT did"
        )
    else:
        out["better_than_sft"] = True
        out["reason"] = f"better: {name} {before} -> {after}, {task_change} within tolerance {config.task_tolerance}, KL to SFT {task.get('kl_to_sft')}"
    return out
