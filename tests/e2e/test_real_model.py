"""The real pretrained model through the pipeline at a small budget: SmolLM2-135M-Instruct, named by its GGUF.

sft (LoRA, 4 steps, 96-token rows) → DPO (2 steps) → evaluate (3 test prompts per task) → export (adapters +
merged) on the example's data (examples/real-model/data), then the served answers: the embedded engine and
(marked `vllm`) vLLM's CPU build hold to evaluate's greedy answers token for token, and so does the merged
export in plain transformers. The tests fail when the GGUF base, the BOS count of the label-mask check
(SmolLM2's BOS is ChatML's `<|im_start|>`, rendered once per turn) or serving parity regress.

Budget (measured 2026-12-04 on 2 cores shared by eight sessions, load ~15): the module's pipeline 616-668 s
(sft 273 s, DPO 168 s, evaluate 114 s, export the rest), the whole module 12.5 min without vLLM and 15.7 min with
it (the vLLM test 239 s, its server's start-up included). On idle cores expect a fraction of that.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.evaluate import EvaluateConfig
from tunepipe.schemas.export import ExportConfig
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.align.stage import AlignStage
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.stage import run_stage
from tunepipe.tasks.evaluate.stage import EvaluateStage
from tunepipe.tasks.export.stage import ExportStage
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.lm.retention import SET_NAME, general_set
from tests.helpers.real_model import smollm2_gguf
from tests.helpers.training import cpu_profile

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

torch.set_num_threads(1)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "real-model"
NEW_TOKENS = 8
PER_TASK = 3
GENERAL_TOKENS = 12  # enough for "The capital of France is Paris."


def example_module(name: str):
    """A script of examples/real-model (not an importable package: the folder's name has a dash)."""
    spec = importlib.util.spec_from_file_location(f"real_model_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_data(store_root: Path) -> ArtifactRef:
    """The example's records as a published data artifact (with a manifest, so a run's lineage reads as a
    pipeline's): every 4th record of a task is a test record, every 8th (offset 1) a validation record;
    preference pairs the same way."""
    make = example_module("make_data")
    key = "real-model-data"
    path = store_root / "data" / key
    path.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for task, rows in (("capitals", make.capital_records()), ("sentiment", make.sentiment_records())):
        for i, row in enumerate(rows):
            split = "test" if i % 4 == 3 else "validation" if i % 8 == 1 else "train"
            splits[split].append({"id": f"{task}-{i}", "task": task, **row})
    for split, rows in splits.items():
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"id": f"p{i}", "task": "sentiment", **p, "split": "test" if i % 4 == 3 else "train"}
             for i, p in enumerate(make.preference_records())]
    (path / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    now = "2026-12-04T00:00:00+00:00"
    (path / "manifest.json").write_text(json.dumps({"stage": "data", "key": key, "metrics": {}, "inputs": {}, "config": {},
                                                    "timings": {"started_at": now, "finished_at": now, "seconds": 0.0}}))
    return ArtifactRef(stage="data", key=key, path=str(path))


def _metrics(ref: ArtifactRef) -> dict:
    return json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    gguf = smollm2_gguf()
    root = tmp_path_factory.mktemp("real-model")
    data = write_data(root / "artifacts")
    store = ArtifactStore(root / "artifacts")
    env = cpu_profile(per_device_batch_size=4)
    sft_config = SFTConfig.model_validate({
        "model": str(gguf), "max_length": 96,
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"max_steps": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0, "save_steps": 1000},
        # The general set's retention is measured once, by evaluate (its guard is asserted below): on a 2-core
        # machine each pass over its 48 questions costs about a minute on this model.
        "heldout": {"max_examples_per_task": 2, "max_new_tokens": NEW_TOKENS, "batch_size": 4, "general_set": "off"},
    })
    sft = run_stage(SFTStage(), sft_config, {"data": data}, store, env)
    align = run_stage(AlignStage(), AlignConfig.model_validate({
        "method": {"name": "dpo", "beta": 0.1}, "max_length": 96,
        "training": {"max_steps": 2, "learning_rate": 5e-4, "warmup_ratio": 0.0, "save_steps": 1000},
        "heldout": {"max_pairs": 2, "max_examples_per_task": 2, "max_new_tokens": NEW_TOKENS, "batch_size": 4, "general_set": "off"},
    }), {"data": data, "sft": sft}, store, env)
    evaluate = run_stage(EvaluateStage(), EvaluateConfig.model_validate({
        "baseline": "base", "max_examples_per_task": PER_TASK, "generation": {"max_new_tokens": NEW_TOKENS, "batch_size": 4},
        "ab": {"bootstrap_samples": 200}, "regression": {"general_max_new_tokens": GENERAL_TOKENS},
    }), {"data": data, "sft": sft, "align": align}, store, env)
    export = run_stage(ExportStage(), ExportConfig.model_validate({
        "targets": ["adapters", "merged"], "reeval": {"max_examples_per_task": 2, "max_new_tokens": NEW_TOKENS, "batch_size": 4},
    }), {"data": data, "sft": sft, "align": align}, store, env)
    return {"gguf": gguf, "root": root, "data": data, "sft": sft, "align": align, "evaluate": evaluate, "export": export}


def _predictions(run) -> list[dict]:
    """Evaluate's answers on the trained tasks (the general set's rows are answered at their own length)."""
    rows = [json.loads(line) for line in (Path(run["evaluate"].path) / "predictions.jsonl").read_text().splitlines()]
    return [row for row in rows if not row["task"].startswith(SET_NAME)]


def _engine(run):
    from tunepipe.tasks.serving.engine import MultiLoraEngine

    engine = MultiLoraEngine(str(run["gguf"]), max_rank=16)  # the GGUF itself: the engine serves its conversion
    engine.load_adapter("tuned", Path(run["export"].path) / "adapters" / "all")
    return engine


def _engine_rows(engine, prompts: list[str], adapter: str | None):
    from tunepipe.tasks.serving.engine import Row
    from tunepipe.tasks.lm.encoding import encode_text

    rows = [Row(prompt_ids=list(encode_text(engine.tokenizer, p)["input_ids"]), adapter=adapter, max_tokens=NEW_TOKENS,
                emit=lambda e: None) for p in prompts]
    engine.generate(rows)
    return rows


def test_the_gguf_is_the_base_keyed_by_its_bytes_and_recorded_as_dequantised(run):
    from tunepipe.tasks.lm.modeling import model_dir, model_fingerprint

    manifest = json.loads((Path(run["sft"].path) / "manifest.json").read_text())
    assert manifest["config"]["model"] == model_fingerprint(run["gguf"]) and manifest["config"]["model"].startswith("gguf:sha256:")
    assert manifest["config"]["model_gguf"] == {"dequantised_from": "Q4_1", "note": "weights dequantised from Q4_1"}
    outputs = json.loads((Path(run["sft"].path) / "outputs.json").read_text())
    assert outputs["base_model"] == model_dir(run["gguf"])  # every later stage (and vLLM) reads the converted directory
    card = (Path(run["export"].path) / "README.md").read_text()
    assert "weights dequantised from Q4_1" in card and "SmolLM2-135M-Instruct.Q4_1.gguf" in card


def test_label_mask_passes_with_one_bos_per_rendered_turn(run):
    from tunepipe.tasks.lm.encoding import encode_records
    from tunepipe.tasks.lm.modeling import load_tokenizer

    checks = _metrics(run["sft"])["checks"]["all"]
    assert all(c["passed"] for c in checks.values()), checks
    assert checks["label_mask"]["rows"] > 0 and "warned" not in checks["label_mask"]
    tokenizer = load_tokenizer(run["gguf"])
    records = [json.loads(line) for line in (Path(run["data"].path) / "train.jsonl").read_text().splitlines()]
    by_task, stats = encode_records(records, tokenizer, tokenizer.chat_template, max_length=96, train_on_inputs=False)
    rows = [row for task_rows in by_task.values() for row in task_rows]
    assert stats.label_mask_failed == 0 and len(rows) == len(records)
    # SmolLM2's template renders its default system turn, the user turn and the answer: three <|im_start|>, all its own
    assert {row["input_ids"].count(tokenizer.bos_token_id) for row in rows} == {3}


def test_dpo_evaluate_and_export_ran_with_their_checks(run):
    align = _metrics(run["align"])
    assert align["global_step"] == {"all": 2} and all(c["passed"] for c in align["checks"]["all"].values())
    evaluate = _metrics(run["evaluate"])
    assert evaluate["candidate"] == "align" and set(evaluate["tasks"]) == {"capitals", "sentiment"}
    assert all(s["n"] == PER_TASK for s in evaluate["tasks"].values())
    export = _metrics(run["export"])
    check = export["checks"]["merged_matches_adapter"]["all"]
    assert check["passed"] and check["max_logit_difference"] < 1e-3


def test_embedded_engine_and_merged_export_answer_what_evaluate_scored(run):
    """Greedy parity: the embedded server's engine (base + exported adapter) answers evaluate's prompts with
    evaluate's candidate answers, the bare base with its baseline answers, and the merged export in plain
    transformers produces the engine's tokens."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.training import offline_tokens

    predictions = _predictions(run)
    prompts = [p["prompt"] for p in predictions]
    engine = _engine(run)
    for side, adapter in (("candidate", "tuned"), ("baseline", None)):
        rows = _engine_rows(engine, prompts, adapter)
        served = [engine.tokenizer.decode(row.tokens, skip_special_tokens=True).strip() for row in rows]
        assert served == [p[side].strip() for p in predictions], side
    tuned = _engine_rows(engine, prompts, "tuned")
    merged = AutoModelForCausalLM.from_pretrained(Path(run["export"].path) / "merged" / "all", dtype=torch.float32).eval()
    for row in tuned:
        assert offline_tokens(merged, row.prompt_ids, set(engine.eos_ids), NEW_TOKENS) == row.tokens


def test_the_forgetting_guard_runs_on_the_pretrained_base(run):
    """A pretrained base (not one the pipeline built) gets the general-knowledge set by default: evaluate scores
    both models on it and the gate's forgetting rule judges the drop instead of skipping it."""
    from tunepipe.schemas.evaluate import GateRules
    from tunepipe.tasks.evaluate.gate import drop_rule
    from tunepipe.tasks.lm.retention import METRIC

    evaluate = _metrics(run["evaluate"])
    general = evaluate["regression"][SET_NAME]
    assert general["n"] == len(general_set()) and general["baseline"] > 0.0, general  # the base knows some of it
    answered = [json.loads(line) for line in (Path(run["evaluate"].path) / "predictions.jsonl").read_text().splitlines()]
    rows = [row for row in answered if row["task"] == SET_NAME]
    assert len(rows) == len(general_set())
    # The retention figures are the answers' own scores: each model's share of questions answered, and the
    # questions the candidate lost (the base answered them, the candidate did not).
    cand = [row["candidate_scores"][METRIC] for row in rows]
    base = [row["baseline_scores"][METRIC] for row in rows]
    assert general["candidate"] == round(sum(cand) / len(cand), 4) and general["baseline"] == round(sum(base) / len(base), 4)
    assert general["lost"] == [item["id"] for item, c, b in zip(general_set(), cand, base) if b > c]
    # The gate judged exactly these figures against the default tolerance: its line is the drop rule on them (the
    # general set is the only regression entry), and its verdict follows the drop.
    tolerance = GateRules().max_forgetting_drop
    forgetting = [r for r in evaluate["gate_reasons"] if "max forgetting drop" in r]
    assert forgetting == [drop_rule("max forgetting drop", tolerance, {SET_NAME: (general["candidate"], general["baseline"])},
                                    "regression", "")], evaluate["gate_reasons"]
    assert f"({general['baseline']:.3f} → {general['candidate']:.3f})" in forgetting[0]
    forgot = general["baseline"] - general["candidate"] > tolerance
    assert forgetting[0].startswith("FAIL" if forgot else "PASS")
    if forgot:  # a candidate that forgot is held back: the aligned adapter does not ship
        assert not evaluate["gate_passed"] and evaluate["winner"] != "align", evaluate


def test_the_example_results_script_reads_this_run(run):
    """examples/real-model/results.py on a real run's manifests: base, SFT and aligned per task and metric."""
    results = example_module("results")
    stages = results.lineage(run["root"], results.latest_artifact(run["root"], "evaluate"))
    assert sorted(stages) == ["align", "data", "evaluate", "sft"]
    table = results.results_markdown(stages)
    assert "Base = SmolLM2-135M-Instruct (weights dequantised from Q4_1)" in table
    evaluate = _metrics(run["evaluate"])
    for task in ("capitals", "sentiment"):
        base, aligned = evaluate["baseline_metrics"][task]["exact_match"], evaluate["candidate_metrics"][task]["exact_match"]
        sft = _metrics(run["sft"])["heldout"][task]["exact_match"]
        assert f"| {task} | exact match (n={PER_TASK}) | {base:.2f} | {sft:.2f} | {aligned:.2f} |" in table
    assert "| data | sft | align | evaluate | sum |" in results.times_markdown(stages)


@pytest.mark.vllm
def test_vllm_serves_the_gguf_base_and_the_adapter_with_the_embedded_engines_answers(run):
    import httpx
    import openai

    from tunepipe.schemas.serve import ServeConfig
    from tunepipe.tasks.core.environment import load_environment
    from tunepipe.tasks.core.net import free_port
    from tunepipe.tasks.serving.settings import resolve_serve_config
    from tunepipe.tasks.serving.vllm import VLLMServer
    from tunepipe.tasks.lm.modeling import model_dir
    from tests.helpers.vllm import vllm_python_or_skip

    python = vllm_python_or_skip()
    config = resolve_serve_config(ServeConfig(
        base=str(run["gguf"]), engine="vllm", port=free_port(), max_loras=1,
        vllm={"python": python, "extra_args": ["--enforce-eager", "--distributed-executor-backend", "uni"], "health_timeout_s": 600},
    ), load_environment("serve-vllm-cpu"))
    assert config.base == model_dir(run["gguf"])
    assert config.served_model_name == run["gguf"].stem  # listed by the GGUF's name; without the front, vLLM answers to it only
    server = VLLMServer(config, log_file=run["root"] / "vllm.log")
    server.start()
    try:
        adapter = Path(run["export"].path) / "adapters" / "all"
        loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "tuned", "lora_path": str(adapter)}, timeout=120)
        assert loaded.status_code == 200, loaded.text
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
        predictions = _predictions(run)
        prompts = [p["prompt"] for p in predictions]
        engine = _engine(run)
        for model, adapter_name in (("tuned", "tuned"), (config.served_model_name, None)):
            reply = client.completions.create(model=model, prompt=prompts, max_tokens=NEW_TOKENS, temperature=0.0,
                                              extra_body={"add_special_tokens": False, "return_token_ids": True})
            choices = sorted(reply.choices, key=lambda c: c.index)
            rows = _engine_rows(engine, prompts, adapter_name)
            for choice, row in zip(choices, rows):
                produced = choice.model_extra["token_ids"]
                produced = produced[:-1] if choice.finish_reason == "stop" and produced and produced[-1] in engine.eos_ids else produced
                assert produced == row.tokens, (model, choice.text, row.text)
    finally:
        server.stop()
