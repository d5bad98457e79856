"""On-policy preference pairs: sample `k` completions per train prompt from the SFT policy, score
them with the reward model, a rule against the reference answer, or an AI judge (RLAIF:
tasks/training/judge.py, every two samples compared), and pair the best with the worst. Prompts whose samples all score the same give no preference and are skipped (counted).

The pairs have the data artifact's preference-record shape (plus `prompt_messages`, `scores`),
and the stage writes them into its artifact as `preferences.on_policy.jsonl`: a data artifact
like any other, which a later run can read back as a `format: preference` source.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tunepipe.schemas.align import PreferencesConfig
from tunepipe.tasks.align.rewards import RULES
from tunepipe.tasks.training.encoding import stop_token_ids
from tunepipe.tasks.training.pairs import render_conversation, render_prompt
from tunepipe.tasks.training.reward_model import score_texts


def sample_completions(model: Any, tokenizer: Any, prompt: str, settings: PreferencesConfig) -> list[str]:
    """`k` sampled completions of one rendered prompt."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(
            **batch, do_sample=True, temperature=settings.temperature, top_k=0, top_p=1.0,
            max_new_tokens=settings.max_new_tokens, num_return_sequences=settings.k,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer, model.generation_config),
        )
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)]


def on_policy_pairs(
    model: Any, tokenizer: Any, prompts: list[dict[str, Any]], settings: PreferencesConfig, reward: tuple[Any, Any] | None, seed: int,
    judge: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(pairs, counts): best-vs-worst pairs of the policy's own samples."""
    import torch

    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    pairs, ties = [], 0
    for record in prompts[: settings.max_prompts]:
        samples = sample_completions(model, tokenizer, render_prompt(tokenizer, record["prompt"]), settings)
        if settings.scorer == "reward_model":
            assert reward is not None, "the stage checks that a reward input exists"
            rm, rm_tokenizer = reward
            scores = score_texts(rm, rm_tokenizer, [render_conversation(rm_tokenizer, record["prompt"], s) for s in samples])
        elif settings.scorer == "judge":
            assert judge is not None, "the config requires a judge section for this scorer"
            # RLAIF: every two samples compared by the AI judge (both orders); score = share won.
            scores = judge.tournament(record["prompt"], record["reference"], samples)
        else:
            scores = [RULES[settings.rule](s, record["reference"]) for s in samples]
        best = max(range(len(samples)), key=scores.__getitem__)
        worst = min(range(len(samples)), key=scores.__getitem__)
        if scores[best] == scores[worst] or samples[best] == samples[worst]:
            ties += 1
            continue
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
    return pairs, {"prompts": min(len(prompts), settings.max_prompts), "pairs": len(pairs), "no_preference": ties}
