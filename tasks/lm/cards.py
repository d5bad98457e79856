"""Model cards (README.md with Hub metadata) through huggingface_hub's ModelCard/ModelCardData/EvalResult.

Used by the export stage (the exported models' card, with the test-split results as `model-index`)
and by the training jobs for the adapters they save (instead of PEFT's blank template). The base
model is named by its Hub id when one is known, never by a local path (the Hub rejects those and
the path means nothing on another machine). Cards hold no timestamps: same inputs, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunepipe.schemas.base import looks_like_hub_id


def base_model_id(base: str | None, override: str | None = None) -> str | None:
    """The base's Hub id: the override, the recorded base when it is one, else its config.json's `_name_or_path`."""
    if override:
        return override
    if not base:
        return None
    if looks_like_hub_id(base):
        return base
    config = Path(base) / "config.json"
    try:
        named = json.loads(config.read_text()).get("_name_or_path")
    except (OSError, ValueError):
        return None
    return named if isinstance(named, str) and looks_like_hub_id(named) else None


def base_model_name(base: str | None, hub_id: str | None) -> str:
    """How the text names the base: its Hub id, else the local directory's last parts (no absolute path)."""
    if hub_id:
        return hub_id
    if not base:
        return "unknown"
    parts = Path(base).parts
    return "/".join(parts[-3:]) if len(parts) >= 3 else Path(base).name


def eval_results(scores: dict[str, dict[str, dict[str, float]]], dataset_type: str, dataset_name: str) -> list[Any]:
    """`model-index` results: per task, exact match and token F1 on the test split ({task: {metric: value, n}})."""
    from huggingface_hub import EvalResult

    results = []
    for task, values in sorted(scores.items()):
        for metric, name in (("exact_match", "exact match"), ("token_f1", "token F1")):
            if metric in values:
                results.append(EvalResult(
                    task_type="text-generation", task_name=f"{task} (instruction following)",
                    # The task as the dataset's config: huggingface_hub groups results by task and dataset
                    # type/config/split, so without it every task's scores merged under the first name.
                    dataset_type=dataset_type, dataset_name=f"{dataset_name}: {task}", dataset_config=task, dataset_split="test",
                    metric_type=metric if metric == "exact_match" else "f1", metric_name=name,
                    metric_value=round(float(values[metric]), 4),
                ))
    return results


def build_card(
    *, title: str, body: str, base: str | None, library: str, method: str, tags: list[str] | None = None,
    base_override: str | None = None, license: str | None = None, datasets: list[str] | None = None,
    language: list[str] | None = None, model_name: str | None = None, results: list[Any] | None = None,
) -> Any:
    """A `huggingface_hub.ModelCard`: metadata (base model, library, licence, datasets, model-index) and text."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_id = base_model_id(base, base_override)
    data = ModelCardData(
        base_model=hub_id, library_name=library, license=license, datasets=datasets or None, language=language or None,
        tags=["tunepipe", method, *(tags or [])], pipeline_tag="text-generation",
        model_name=model_name if results else None, eval_results=results or None,
    )
    base_line = f"- **Base model:** `{base_model_name(base, hub_id)}`" + ("" if hub_id else " (built locally; no Hub id)")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{base_line}\n\n{body.strip()}\n")


def adapter_card(*, base: str | None, method: str, tasks: list[str] | None, training: dict[str, Any], stage: str) -> str:
    """The card a training job writes next to the adapter it saves."""
    hyper = {k: training.get(k) for k in ("learning_rate", "max_steps", "epochs", "lr_scheduler", "seed") if k in training}
    body = "\n".join([
        f"A **{method}** adapter trained by tunepipe's `{stage}` stage"
        + (f" on the task(s) {', '.join(f'`{t}`' for t in tasks)}." if tasks else " on every task of the data."),
        "",
        "## Training",
        "",
        "```json",
        json.dumps(hyper, indent=1, sort_keys=True),
        "```",
        "",
        "Load with `peft.PeftModel.from_pretrained(base, this_directory)`; the export stage's card adds the test-split results.",
    ])
    card = build_card(title=f"{stage} adapter ({method})", body=body, base=base, library="peft", method=method)
    return str(card)
