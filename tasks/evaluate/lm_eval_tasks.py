"""lm-evaluation-harness on the test split, and on any lm-eval task the user names.

Each evaluated task of the data split becomes a local lm-eval task: a JSONL of {prompt,
reference} and a YAML (`generate_until`, greedy, lm-eval's own `exact_match`). The prompt is the
chat-template rendering the stage itself generates from, and a filter normalises answers the
way the stage's exact match does (the task's `scoring` normalisation and labels), so lm-eval's figure and the stage's agree on the same model.

The model object is handed to `HFLM` as it is (a PeftModel with the right adapter active, or a
plain model), with `add_bos_token=False` because the rendered prompt already holds any BOS.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import yaml
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.encoding import reasoning_end
from tunepipe.tasks.lm.metrics import DEFAULT_SCORER, extract_label, normalise

TASK_PREFIX = "tunepipe_"
FILTER_MODULE = "tunepipe_lm_eval_filters"
FILTER_NAME = "normalised"
FILTER_HEADER = '''"""Written by tunepipe's evaluate stage: each task's answers normalised (and, for a classification
task, read as the one label they name) exactly as the stage's exact match does; the references in
the task's JSONL are normalised the same way."""

import re
import string

'''


def filter_source(scorers: dict[str, Any]) -> str:
    """The filter module: the stage's own normalisation functions (their source, so the directory runs
    without tunepipe installed) and one filter per task with its normalisation and labels."""
    parts = [FILTER_HEADER, inspect.getsource(normalise), "\n\n", inspect.getsource(extract_label)]
    for task, scorer in scorers.items():
        parts.append(
            f"\n\ndef {filter_function(task)}(resps, docs):\n"
            f"    labels, mode = {list(scorer.labels)!r}, {scorer.normalisation!r}\n"
            "    return [[normalise(extract_label(r, labels, mode) if labels else r, mode) for r in inst] for inst in resps]\n"
        )
    return "".join(parts)


def filter_function(task: str) -> str:
    return "answer_" + re.sub(r"[^A-Za-z0-9_]", "_", task)


def lm_eval_task_name(task: str) -> str:
    return TASK_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", task)


def task_yaml(name: str, data_file: str, max_new_tokens: int, cache_dir: str | None = None, function: str = "") -> str:
    """One generate_until task over a local JSONL. The `!function` tag is lm-eval's way to name a
    Python function next to the YAML (here the task's normalising filter), so it is spliced in as text."""
    dataset_kwargs: dict[str, Any] = {"data_files": {"test": data_file}}
    if cache_dir:
        dataset_kwargs["cache_dir"] = cache_dir
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": dataset_kwargs,
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "reference",
        "num_fewshot": 0,
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    text = yaml.safe_dump(spec, sort_keys=False)
    return text + (
        "filter_list:\n"
        f"  - name: {FILTER_NAME}\n"
        "    filter:\n"
        f"      - function: custom\n        filter_fn: !function {FILTER_MODULE}.{function}\n"
        "      - function: take_first\n"
    )


def write_local_tasks(
    directory: Path, examples: dict[str, list[tuple[str, str]]], max_new_tokens: int, *, cache_dir: str | None = None, portable: bool = False,
    scorers: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write one lm-eval task per data task; returns {data task: lm-eval task name}.

    `portable`: data_files name the JSONL relative to the directory (a copy kept in the artifact,
    run from inside it); otherwise absolute (the copy this run evaluates).
    """
    scorers = {task: (scorers or {}).get(task, DEFAULT_SCORER) for task in examples}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{FILTER_MODULE}.py").write_text(filter_source(scorers))
    names = {}
    for task, rows in examples.items():
        name = lm_eval_task_name(task)
        data_file = directory / f"{name}.jsonl"
        mode = scorers[task].normalisation
        data_file.write_text("".join(json.dumps({"prompt": p, "reference": normalise(r, mode)}) + "\n" for p, r in rows))
        target = data_file.name if portable else str(data_file.resolve())
        (directory / f"{name}.yaml").write_text(task_yaml(name, target, max_new_tokens, None if portable else cache_dir, filter_function(task)))
        names[task] = name
    return names


def task_manager(include_paths: list[str], wanted: list[str]) -> Any:
    """Local tasks only; lm-eval's built-in index (slow to build) only when a wanted task is not local."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_paths, include_defaults=False)
    missing = [t for t in wanted if t not in local.all_subtasks and t not in getattr(local, "all_groups", [])]
    if not missing:
        return local
    full = TaskManager(include_path=include_paths, include_defaults=True)
    unknown = [t for t in missing if t not in full.all_tasks]
    if unknown:
        raise StageFailed(
            f"evaluate: lm-eval tasks {unknown} are neither under {include_paths} nor built into lm-eval: check the names "
            "(`lm-eval ls tasks`) or add their directory to evaluate.lm_eval.include_paths"
        )
    return full


def think_end_id(tokenizer: Any) -> int | None:
    """A reasoning family's `</think>` as a token id, for HFLM's `think_end_token`: lm-eval then scores the
    answer after the think block, as evaluate's own generation does (by id, so it works whether or not the
    tokenizer marks the tag special and decoding drops it)."""
    end = reasoning_end(tokenizer)
    return None if end is None else int(tokenizer.convert_tokens_to_ids(end))


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    manager: Any,
    *,
    batch_size: int,
    limit: int | None = None,
) -> dict[str, Any]:
    """{"results": {task: {metric: value}}, "samples": {task: [{doc, prediction, exact_match?}]}}. `model` is a
    model object (run through HFLM) or an lm-eval model already (a served model's API backend)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.models.huggingface import HFLM

    lm = model if isinstance(model, LM) else HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False, think_end_token=think_end_id(tokenizer)
    )
    try:
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=True)
    except Exception as exc:  # lm-eval raises many kinds; the dataset of a hub task being unreachable is the usual one
        raise StageFailed(f"evaluate: lm-eval failed on tasks {tasks}: {type(exc).__name__}: {exc}") from exc
    results = {task: _numeric(values) for task, values in out["results"].items()}
    samples = {
        task: [{"doc": s["doc"], "prediction": s["filtered_resps"][0] if s["filtered_resps"] else None,
                **({"exact_match": s["exact_match"]} if "exact_match" in s else {})} for s in rows]
        for task, rows in out.get("samples", {}).items()
    }
    return {"results": results, "samples": samples}


def headline(values: dict[str, float]) -> tuple[str, float] | None:
    """A task's main figure: its first metric that is not a standard error."""
    for key, value in values.items():
        if "_stderr" not in key:
            return key, value
    return None


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
