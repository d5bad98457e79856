"""Planted forgetting: an aligned candidate that overwrote what its pretrained base knew is held
back by the gate's forgetting rule on tunepipe's general-knowledge set, and the SFT adapters it
started from (which kept that knowledge and passed against the base) are exported and deployed
instead of nothing.

The controlled setup, on the tiny model: a "pretrained" base is the tiny model fully fine-tuned
to answer the general set (so it has knowledge to lose, which a random tiny model has not); SFT
is a LoRA on a sentiment task over that base, with the general questions replayed; the planted
candidate is the same run with the replayed questions answered by a refusal ("I cannot say."),
published under an align manifest that says it kept its task metric. The gate here has no
win-rate rule (aligned and SFT adapters tie on the sentiment task), so the forgetting rule is
the only one that can hold the candidate back, and the test checks it is the one that did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.deploy import DeployConfig
from tunepipe.schemas.evaluate import EvaluateConfig
from tunepipe.schemas.export import ExportConfig
from tunepipe.schemas.handoffs import DeployDecision, ExportIndex, GateVerdict, ModelOutputs
from tunepipe.schemas.manifest import ArtifactRef, Manifest
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.handoff import read_handoff
from tunepipe.tasks.core.stage import run_stage
from tunepipe.tasks.deploy.stage import DeployStage
from tunepipe.tasks.evaluate.stage import EvaluateStage
from tunepipe.tasks.export.stage import ExportStage
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.lm.retention import general_set
from tests.helpers.training import WORDS, build_tiny_model, cpu_profile

torch.set_num_threads(1)

SUBJECTS = sorted(set(WORDS))[:24]
# No win-rate rule (aligned and SFT adapters tie on sentiment); a task-metric tolerance of one of the
# 12 test prompts (the planted run misses one more than SFT); forgetting held to 0.1.
GATE = {"min_win_rate_lower_bound": None, "max_task_metric_drop": 0.1, "max_forgetting_drop": 0.1}


def _write_data(path: Path, key: str, train: list[dict], test: list[dict]) -> ArtifactRef:
    path.mkdir(parents=True)
    for split, rows in (("train", train), ("validation", train[::6]), ("test", test)):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ArtifactRef(stage="data", key=key, path=str(path))


def _general(answer_of, task: str = "general") -> list[dict]:
    items = general_set()
    return [{"id": f"g{i}", "task": task, "instruction": item["prompt"], "input": "", "output": answer_of(i)} for i, item in enumerate(items)]


def _sentiment() -> tuple[list[dict], list[dict]]:
    rows = [
        {"id": f"{label}-{w}", "task": "sentiment", "instruction": "Classify the sentiment.", "input": f"I {verb} the {w}.", "output": label}
        for w in SUBJECTS for verb, label in (("love", "positive"), ("hate", "negative"))
    ]
    return rows[::2] + rows[1::4], rows[3::4]


def _sft(base: str, data: ArtifactRef, store: ArtifactStore, **config) -> ArtifactRef:
    settings = {
        "model": base, "max_length": 64,
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 60, "learning_rate": 1e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0, "save_steps": 1000},
        "heldout": {"max_examples_per_task": 8, "max_new_tokens": 8},
        **config,
    }
    return run_stage(SFTStage(), SFTConfig.model_validate(settings), {"data": data}, store, cpu_profile(per_device_batch_size=16))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("forgetting")
    store = ArtifactStore(root / "artifacts")
    items = general_set()
    texts = [f"{item['prompt']} {' '.join(item['answers'])}" for item in items]
    tiny = build_tiny_model(root / "tiny", texts=texts)

    # A base with general knowledge: the tiny model fully fine-tuned on the general set's questions.
    knows = _write_data(root / "knowledge", "knowledge", _general(lambda i: items[i]["answers"][0]) * 2, _general(lambda i: items[i]["answers"][0]))
    pretrained = _sft(str(tiny), knows, store, method={"name": "full"},
                      training={"max_steps": 150, "learning_rate": 3e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "save_steps": 1000},
                      heldout={"max_examples_per_task": 0})
    base = str(Path(pretrained.path) / read_handoff(pretrained, ModelOutputs, reader="test").paths["all"])

    # SFT: the sentiment task with the general questions replayed (a LoRA this small on a model this
    # small forgets them otherwise), so it keeps what the base knew.
    train, test = _sentiment()
    data = _write_data(root / "data", "sentiment", train + _general(lambda i: items[i]["answers"][0]), test)
    sft = _sft(base, data, store)

    # The planted forgetting: the same run, but every replayed general question answered with a refusal.
    wrong = _write_data(root / "wrong", "wrong", train + _general(lambda i: "I cannot say."), test)
    forgot = _sft(base, wrong, store)
    aligned = root / "align"
    shutil.copytree(forgot.path, aligned)
    manifest = Manifest.model_validate_json((aligned / "manifest.json").read_text())
    manifest = manifest.model_copy(update={
        "stage": "align", "config": {**(manifest.config or {}), "task_tolerance": 0.05},
        "metrics": {"task_metric_within_tolerance": True, "heldout": {"all": {"task": {"task_metric": "token_f1", "task_metric_drop": 0.0}}}},
    })
    (aligned / "manifest.json").write_text(manifest.model_dump_json())
    align = ArtifactRef(stage="align", key="planted-forgetting", path=str(aligned))
    return {"root": root, "store": store, "base": base, "data": data, "sft": sft, "align": align}


def test_sft_reports_its_retention_on_the_general_set(world):
    m = json.loads((Path(world["sft"].path) / "manifest.json").read_text())["metrics"]
    kept = m["retention"]["all"]
    assert kept["set"] == "general_chat" and kept["n"] == len(general_set())
    assert kept["base"] >= 0.5  # the controlled base knows the set
    assert kept["change"] == round(kept["trained"] - kept["base"], 4)


def test_planted_forgetting_is_held_back_and_the_sft_adapters_ship_instead(world):
    inputs = {"data": world["data"], "sft": world["sft"], "align": world["align"]}
    evaluate = run_stage(
        EvaluateStage(),
        EvaluateConfig.model_validate({
            "tasks": ["sentiment"], "max_examples_per_task": 16, "generation": {"max_new_tokens": 6}, "lm_eval": {"enabled": False},
            "regression": {"general_max_new_tokens": 8},
            "gate": GATE,
        }),
        inputs, world["store"], cpu_profile(),
    )
    m = json.loads((Path(evaluate.path) / "manifest.json").read_text())["metrics"]
    general = m["regression"]["general_chat"]
    assert m["candidate"] == "align" and m["baseline"] == "sft"
    assert general["baseline"] - general["candidate"] > 0.1 and general["lost"]
    assert m["gate_passed"] is False
    failed = [r for r in m["gate_reasons"] if r.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL max forgetting drop 0.1: worst regression change") and "on general_chat" in failed[0]

    # SFT against the base: it learned the task and kept the general set within the tolerance.
    fallback = m["fallback"]
    assert fallback["candidate"] == "sft" and fallback["baseline"] == "base" and fallback["gate_passed"] is True
    assert fallback["regression"]["general_chat"]["baseline"] - fallback["regression"]["general_chat"]["candidate"] <= 0.1
    assert m["winner"] == "sft" and "the sft adapters passed the same gate against the base" in m["winner_reason"]
    verdict = read_handoff(evaluate, GateVerdict, reader="test")
    assert verdict.winner == "sft" and verdict.winner_key == world["sft"].key and verdict.fallback_reasons

    export = run_stage(
        ExportStage(), ExportConfig.model_validate({"targets": ["adapters"], "serving_engine": "embedded", "reeval": {"max_examples_per_task": 4, "max_new_tokens": 4}}),
        {**inputs, "evaluate": evaluate}, world["store"], cpu_profile(),
    )
    index = read_handoff(export, ExportIndex, reader="test")
    assert (index.source.stage, index.source.key) == ("sft", world["sft"].key)
    assert "evaluate's winner" in json.loads((Path(export.path) / "manifest.json").read_text())["metrics"]["source_reason"]

    deploy = run_stage(
        DeployStage(), DeployConfig.model_validate({"name": "forgetful", "registry": str(world["root"] / "registry")}),
        {"export": export, "evaluate": evaluate}, world["store"], cpu_profile(),
    )
    decision = read_handoff(deploy, DeployDecision, reader="test")
    assert decision.decision == "promoted" and decision.source == f"sft:{world['sft'].key}"
    assert decision.gate_reasons[0].startswith("evaluate's winner sft:") and decision.serving["forgetful"]["version"] == 1


def test_an_export_of_the_rejected_candidate_is_not_promoted(world, tmp_path):
    """export.source: align against a verdict whose winner is sft: deploy refuses, saying why."""
    inputs = {"data": world["data"], "sft": world["sft"], "align": world["align"]}
    config = EvaluateConfig.model_validate({
        "tasks": ["sentiment"], "max_examples_per_task": 16, "generation": {"max_new_tokens": 6}, "lm_eval": {"enabled": False},
        "regression": {"general_max_new_tokens": 8},
        "gate": GATE,
    })
    evaluate = run_stage(EvaluateStage(), config, inputs, world["store"], cpu_profile())  # cached: the same key as above
    export = run_stage(
        ExportStage(), ExportConfig.model_validate({"source": "align", "targets": ["adapters"], "serving_engine": "embedded",
                                                    "reeval": {"max_examples_per_task": 4, "max_new_tokens": 4}}),
        {**inputs, "evaluate": evaluate}, world["store"], cpu_profile(),
    )
    deploy = run_stage(
        DeployStage(), DeployConfig.model_validate({"name": "forgetful2", "registry": str(tmp_path / "registry")}),
        {"export": export, "evaluate": evaluate}, world["store"], cpu_profile(),
    )
    decision = read_handoff(deploy, DeployDecision, reader="test")
    assert decision.decision == "not_promoted" and decision.registered == {}
    assert "but evaluate's winner is sft" in decision.gate_reasons[0]
