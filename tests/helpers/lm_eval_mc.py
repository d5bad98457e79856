"""A locally made multiple-choice task for lm-eval, scored through any lm-eval model (`hf`, `local-completions`):
the serving tests hold each engine's log-likelihoods to transformers' own through it."""

from __future__ import annotations

import json
from pathlib import Path


def write_mc_task(folder: Path, items: list[dict]) -> Path:
    """`tiny_mc` (question, choices, answer index) as an lm-eval task folder; `items` as the test split."""
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    return folder


def run_mc(folder: Path, model: str, model_args: str) -> tuple[float, list[list[float]]]:
    """(accuracy, each item's per-choice log-likelihoods) of `tiny_mc` in `folder` under lm-eval's `model`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc"], device="cpu",
                                     task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                                     bootstrap_iters=0, log_samples=True)
    samples = sorted(result["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    return result["results"]["tiny_mc"]["acc,none"], [[float(r[0][0]) for r in s["resps"]] for s in samples]
