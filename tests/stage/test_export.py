"""The export stage: merged and bnb exports load like any HF model and behave like base + adapter;
quantized exports are re-evaluated; adapters a vLLM server cannot serve are refused up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tunepipe.schemas.export import ExportConfig
from tunepipe.schemas.handoffs import GateVerdict
from tunepipe.schemas.manifest import ArtifactRef, Manifest, Timings
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.handoff import write_handoff
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.export.stage import ExportStage, compressor_modifier, vllm_problems
from tunepipe.tasks.sft.stage import SFTStage

from tests.helpers.training import build_tiny_model, cpu_profile, sft_key_payload, write_data_artifact

torch.set_num_threads(1)

PROMPT = "<|im_start|>user\nClassify the sentiment.\n\nI love the cat.<|im_end|>\n<|im_start|>assistant\n"


def fake_artifact(path: Path, stage: str, key: str, *, metrics: dict | None = None, config: dict | None = None) -> ArtifactRef:
    """A published-looking artifact of another stage: just the manifest the export stage reads (an sft one
    records a real sft key payload, as export reads it typed)."""
    path.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = sft_key_payload() if stage == "sft" else {}
    manifest = Manifest(stage=stage, key=key, code_version="test", config=config, metrics=metrics or {},
                        timings=Timings(started_at="t", finished_at="t", seconds=0.0))
    (path / "manifest.json").write_text(manifest.model_dump_json())
    return ArtifactRef(stage=stage, key=key, path=str(path))


def peft_source(root: Path, model: Path, peft_config, name: str) -> ArtifactRef:
    """An sft-shaped artifact holding an untrained adapter of any PEFT type (no training needed to test refusals)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    art = root / name
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), peft_config).save_pretrained(art / "adapter")
    (art / "outputs.json").write_text(json.dumps({"kind": "adapter", "paths": {"all": "adapter"}, "method": name, "base_model": str(model)}))
    return fake_artifact(art, "sft", f"sft-{name}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = build_tiny_model(root / "llama")
    data = write_data_artifact(root / "data")
    store = ArtifactStore(root / "artifacts")
    sft_config = SFTConfig.model_validate(
        {"model": str(model), "method": {"name": "lora", "r": 4}, "max_length": 96, "heldout": {"max_examples_per_task": 0},
         "training": {"max_steps": 6, "learning_rate": 2e-2, "warmup_ratio": 0.0}}
    )
    sft = run_stage(SFTStage(), sft_config, {"data": data}, store, cpu_profile())
    evaluate = fake_artifact(root / "evaluate", "evaluate", "evalkey")
    write_handoff(Path(evaluate.path), GateVerdict(passed=False, reasons=["sentiment exact match 0.20 < 0.50"]))
    return {"root": root, "model": model, "data": data, "sft": sft, "evaluate": evaluate, "store": store}


def _export(assets, config: dict, inputs: dict | None = None, env=None) -> ArtifactRef:
    inputs = inputs or {"sft": assets["sft"], "data": assets["data"], "evaluate": assets["evaluate"]}
    return run_stage(ExportStage(), ExportConfig.model_validate(config), inputs, assets["store"], env or cpu_profile())


def _greedy(model, tokenizer, n: int = 8) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=n, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_merged_and_bnb_exports_load_plainly_and_match_base_plus_adapter(assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = _export(assets, {"targets": ["adapters", "merged", "bnb4", "bnb8"],
                           "reeval": {"max_examples_per_task": 3, "max_new_tokens": 6}})
    root = Path(ref.path)
    exports = json.loads((root / "exports.json").read_text())
    assert exports["targets"] == {"adapters": {"all": "adapters/all"}, "merged": {"all": "merged/all"},
                                  "bnb4": {"all": "bnb4/all"}, "bnb8": {"all": "bnb8/all"}}
    assert (root / "adapters/all/adapter_model.safetensors").exists()

    # The merged export is a plain HF model directory: safetensors, tokenizer with its chat template, generation config.
    merged_dir = root / "merged/all"
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    assert json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id

    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(root / "adapters/all")).eval()
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        merged_logits, adapted_logits = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        with adapted.disable_adapter():
            base_logits = adapted(input_ids=ids).logits
    assert (merged_logits - base_logits).abs().max() > 1e-3, "the adapter learned nothing: the comparison would be vacuous"
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)
    assert _greedy(merged, tokenizer) == _greedy(adapted, tokenizer)

    # bnb exports are pre-quantized checkpoints that load without a quantization argument.
    import bitsandbytes as bnb

    for target, layer in (("bnb4", bnb.nn.Linear4bit), ("bnb8", bnb.nn.Linear8bitLt)):
        qconfig = json.loads((root / target / "all/config.json").read_text())["quantization_config"]
        assert qconfig["quant_method"] == "bitsandbytes" and qconfig[f"load_in_{target[-1]}bit"]
        loaded = AutoModelForCausalLM.from_pretrained(root / target / "all")
        assert isinstance(loaded.model.layers[0].self_attn.q_proj, layer)

    metrics = json.loads((root / "manifest.json").read_text())["metrics"]
    assert metrics["merged_agreement"] == {"all": 1.0}
    scores = metrics["reeval"]["all"]
    assert set(scores) == {"reference", "merged", "bnb4", "bnb8"}
    for target in ("bnb4", "bnb8"):
        assert set(scores[target]) == {"sentiment", "count"} and all(s["n"] == 3 for s in scores[target].values())
        assert 0.0 <= scores[target]["sentiment"]["token_f1"] <= 1.0
    assert scores["merged"] == scores["reference"]
    assert set(metrics["quantization_delta_exact_match"]["all"]) == {"bnb4", "bnb8"}

    card = (root / "README.md").read_text()
    assert assets["data"].key in card and "**failed**" in card and "sentiment exact match 0.20 < 0.50" in card
    assert "| bnb4 | all | sentiment |" in card and f"sft:{assets['sft'].key}" in card
    assert (merged_dir / "README.md").read_text() == card
    assert metrics["gate_passed"] is False


def test_default_targets_without_gate(assets):
    ref = _export(assets, {"reeval": {"max_examples_per_task": 1, "max_new_tokens": 2}}, inputs={"sft": assets["sft"], "data": assets["data"]})
    exports = json.loads((Path(ref.path) / "exports.json").read_text())
    assert set(exports["targets"]) == {"adapters", "merged"} and "gate" not in exports
    assert "no gate verdict" in (Path(ref.path) / "README.md").read_text()


def test_adapters_vllm_cannot_serve_are_refused(assets, tmp_path):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    cases = {
        "dora": (LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), "DoRA"),
        "ia3": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "vLLM serves LoRA adapters only"),
        "prompt": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), "prompt-learning"),
        "mts": (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        "rank": (LoraConfig(r=16, target_modules=["q_proj"]), "rank 16 is above max_lora_rank 8"),
    }
    for name, (peft_config, message) in cases.items():
        source = peft_source(tmp_path, assets["model"], peft_config, name)
        with pytest.raises(StageFailed, match=message):
            _export(assets, {"targets": ["adapters"], "serving_engine": "vllm", "max_lora_rank": 8},
                     inputs={"sft": source, "data": assets["data"]})
    # The embedded engine (transformers + peft) serves a DoRA adapter as it is.
    dora = peft_source(tmp_path, assets["model"], cases["dora"][0], "dora-embedded")
    ref = _export(assets, {"targets": ["adapters"], "serving_engine": "embedded", "reeval": {"max_examples_per_task": 1, "max_new_tokens": 2}},
                  inputs={"sft": dora, "data": assets["data"]})
    assert (Path(ref.path) / "adapters/all/adapter_config.json").exists()


def test_bottleneck_adapters_are_refused_for_vllm_and_merging_but_exported_for_the_embedded_engine(assets, tmp_path):
    from tunepipe.tasks.training import peft_methods

    cases = {
        "adapter": ({"name": "adapter", "bottleneck_size": 4}, "sequential Adapter Tuning"),
        "adapter_drop": ({"name": "adapter_drop", "bottleneck_size": 4}, "AdapterDrop"),
        "mam_adapter": ({"name": "mam_adapter", "prefix_length": 2, "bottleneck_size": 4}, "MAM Adapter"),
        "unipelt": ({"name": "unipelt", "lora_r": 2, "prefix_length": 2, "bottleneck_size": 4}, "UniPELT"),
    }
    for name, (spec, kind) in cases.items():
        config = peft_methods.peft_config(SFTConfig.model_validate({"method": spec}).method)
        source = peft_source(tmp_path, assets["model"], config, name)
        with pytest.raises(StageFailed, match=rf"bottleneck adapter \({kind}\): vLLM serves LoRA adapters only"):
            _export(assets, {"targets": ["adapters"], "serving_engine": "vllm"}, inputs={"sft": source, "data": assets["data"]})
        with pytest.raises(StageFailed, match="cannot be merged"):
            _export(assets, {"targets": ["merged"], "serving_engine": "embedded"}, inputs={"sft": source, "data": assets["data"]})
    ref = _export(assets, {"targets": ["adapters"], "serving_engine": "embedded", "reeval": {"max_examples_per_task": 1, "max_new_tokens": 2}},
                  inputs={"sft": source, "data": assets["data"]})
    assert json.loads((Path(ref.path) / "adapters/all/adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"


def test_vllm_problems_accepts_plain_lora_within_rank():
    assert vllm_problems("all", {"peft_type": "LORA", "r": 8, "use_dora": False, "modules_to_save": None}, 8) == []
    assert "rank 32" in vllm_problems("all", {"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj": 32}}, 16)[0]


def test_unconverted_pissa_adapter_is_refused_for_every_target(assets, tmp_path):
    from peft import LoraConfig

    source = peft_source(tmp_path, assets["model"], LoraConfig(r=4, target_modules=["q_proj"]), "pissa")
    cfg_file = Path(source.path) / "adapter/adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "init_lora_weights": "pissa"}))
    with pytest.raises(StageFailed, match="path_initial_model_for_weight_conversion"):
        _export(assets, {"targets": ["merged"], "serving_engine": "embedded"}, inputs={"sft": source, "data": assets["data"]})


def test_gptq_and_awq_need_a_gpu_profile_and_llm_compressor(assets):
    with pytest.raises(StageFailed) as failure:
        _export(assets, {"targets": ["merged", "gptq", "awq"]})
    message = str(failure.value)
    assert "['gptq', 'awq']" in message and "CUDA device" in message and "profile 'cpu'" in message and "nothing was exported" in message
    assert ("llmcompressor" in message) == (__import__("importlib").util.find_spec("llmcompressor") is None)


def test_compressor_recipes():
    config = ExportConfig.model_validate({"targets": ["gptq", "awq"], "gptq": {"bits": 8, "group_size": 64}})
    gptq, awq = compressor_modifier("gptq", config), compressor_modifier("awq", config)
    assert gptq["class"] == "GPTQModifier" and awq["class"] == "AWQModifier"
    weights = gptq["kwargs"]["config_groups"]["group_0"]["weights"]
    assert weights == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    assert awq["kwargs"]["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert gptq["kwargs"]["ignore"] == ["lm_head"]
    with pytest.raises(ValueError, match="AWQ quantizes weights to 4 bits only"):
        ExportConfig.model_validate({"awq": {"bits": 8}})


def test_full_weights_source_refuses_adapter_target(assets, tmp_path):
    art = tmp_path / "full"
    (art / "model").mkdir(parents=True)
    (art / "outputs.json").write_text(json.dumps({"kind": "model", "paths": {"all": "model"}, "method": "full", "base_model": str(assets["model"])}))
    source = fake_artifact(art, "sft", "sft-full", config=sft_key_payload("full"))
    with pytest.raises(StageFailed, match="remove `adapters` from export.targets"):
        _export(assets, {"targets": ["adapters", "merged"]}, inputs={"sft": source, "data": assets["data"]})


def test_model_card_metadata_parses_with_model_index_and_no_local_path(assets):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    ref = _export(assets, {"targets": ["adapters"], "reeval": {"max_examples_per_task": 2, "max_new_tokens": 2},
                           "card": {"license": "apache-2.0", "datasets": ["tatsu-lab/alpaca"], "language": ["en"]}})
    root = Path(ref.path)
    card = ModelCard.load(root / "README.md")  # the Hub's own parser: YAML front matter into ModelCardData
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["datasets"] == ["tatsu-lab/alpaca"] and data["library_name"] == "peft"
    assert "base_model" not in data  # the tiny base is built locally: no Hub id, and never its path
    assert str(assets["model"]) not in card.content
    name, results = model_index_to_eval_results(data["model-index"])
    reeval = json.loads((root / "manifest.json").read_text())["metrics"]["reeval"]["all"]["reference"]
    assert name == "sft-lora"
    found = {(r.dataset_name, r.metric_type): r.metric_value for r in results}
    assert len(results) == 2 * len(reeval)  # each task's two metrics, none merged into another task's
    for task, scores in reeval.items():
        assert found[(f"tatsu-lab/alpaca: {task}", "exact_match")] == round(scores["exact_match"], 4)
        assert found[(f"tatsu-lab/alpaca: {task}", "f1")] == round(scores["token_f1"], 4)
    assert all(r.dataset_split == "test" and r.task_type == "text-generation" for r in results)
    assert (root / "adapters/all/README.md").read_text() == (root / "README.md").read_text()

    # A hub base is named by its id; the sft adapter's own card is ours, not PEFT's blank template.
    hub = _export(assets, {"targets": ["adapters"], "reeval": {"max_examples_per_task": 1, "max_new_tokens": 2},
                           "card": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}})
    assert ModelCard.load(Path(hub.path) / "README.md").data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    sft_card = (Path(assets["sft"].path) / "adapter" / "README.md").read_text()
    assert "[More Information Needed]" not in sft_card and str(assets["model"]) not in sft_card
    assert ModelCard(sft_card).data.library_name == "peft" and '"max_steps": 6' in sft_card


def test_exports_are_registered_in_mlflow_when_it_tracks(assets, tmp_path):
    from mlflow.tracking import MlflowClient
    from tunepipe.schemas.tracking import TrackingConfig
    from tunepipe.tasks.core.artifacts import ArtifactStore
    from tunepipe.tasks.core.tracking import TrackingSession, finish_pipeline_run

    session = TrackingSession(TrackingConfig(backend="mlflow"), "pipe", str(tmp_path), "export-run")
    config = ExportConfig.model_validate({"targets": ["adapters"], "reeval": {"max_examples_per_task": 1, "max_new_tokens": 2}})
    inputs = {"sft": assets["sft"], "data": assets["data"]}
    ref = run_stage(ExportStage(), config, inputs, ArtifactStore(tmp_path / "artifacts"), cpu_profile(), tracking=session)
    finish_pipeline_run(session)
    client = MlflowClient(f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}")
    versions = client.search_model_versions("name='pipe-adapters-all'")
    assert len(versions) == 1 and versions[0].source == (Path(ref.path) / "adapters" / "all").resolve().as_uri()
    assert client.get_run(versions[0].run_id).data.tags["tunepipe.key"] == ref.key
