"""Real model families end to end: Llama 3.1, Qwen2.5, Qwen3, Mistral v0.3, Gemma 2, Phi-3.

For each family (tests/helpers/families.py: the family's real config class, its special tokens
and its published chat template), one module-scoped run per family goes data → sft (LoRA;
QLoRA for Llama 3 and Phi-3) → DPO → evaluate → export (adapters + merged) → the embedded
server, and the tests check on values what breaks fine-tuning of that family in practice:
BOS count, label spans, the end-of-turn token, the served prompt against the training rows,
template refusals, history-rewriting templates, `tunepipe plan` counts, defaults chosen from
the model. (vLLM parity on these families comes with the real-vLLM work.)
"""

from __future__ import annotations

import json
import logging
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
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.evaluate.stage import EvaluateStage
from tunepipe.tasks.export.stage import ExportStage
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.training.encoding import (
    IGNORE,
    encode_conversation,
    encode_records,
    end_of_turn_token,
    record_messages,
    render_messages,
)
from tests.helpers.families import FAMILIES, family_model
from tests.helpers.training import WORDS, cpu_profile, records

torch.set_num_threads(1)

QLORA = {"llama3", "phi3"}  # QLoRA (4-bit NF4 base) for these, LoRA for the others
MULTI_TURN = {
    "id": "chat-multi", "task": "count", "messages": [
        {"role": "user", "content": "Count to two."}, {"role": "assistant", "content": "one two"},
        {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "one two three"},
    ],
}


def family_records(family: str, split: str) -> list[dict]:
    rows = records(split)
    if split == "train":
        rows = rows + [MULTI_TURN]
    if not FAMILIES[family].system_ok:  # the data a Gemma user would have: no system turns
        rows = [{**r, "messages": [m for m in r["messages"] if m["role"] != "system"]} if "messages" in r else r for r in rows]
    return rows


def write_family_data(path: Path, family: str) -> ArtifactRef:
    path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = family_records(family, split if split != "test" else "validation")
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"id": f"p{i}", "task": "count", "prompt": f"Describe the {w}.", "chosen": "the cat sat", "rejected": "the dog sat",
              "split": "test" if i % 4 == 3 else "train"} for i, w in enumerate(WORDS[:16])]
    (path / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return ArtifactRef(stage="data", key=f"data-{family}", path=str(path))


def _metrics(ref: ArtifactRef) -> dict:
    return json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request, tmp_path_factory):
    """One family through the pipeline; every stage's artifact and metrics."""
    family = request.param
    root = tmp_path_factory.mktemp(f"family-{family}")
    model = family_model(family, tmp_path_factory.getbasetemp() / "family-models")
    data = write_family_data(root / "data", family)
    store = ArtifactStore(root / "artifacts")
    env = cpu_profile(per_device_batch_size=8)
    name = "qlora" if family in QLORA else "lora"
    sft_config = SFTConfig.model_validate({
        "model": str(model), "method": {"name": name, "r": 8, "alpha": 16, "dropout": 0.0}, "max_length": 160,
        "training": {"max_steps": 40, "learning_rate": 2e-2, "warmup_ratio": 0.0, "lr_scheduler": "constant", "save_steps": 1000},
        "heldout": {"max_examples_per_task": 0},
    })
    sft = run_stage(SFTStage(), sft_config, {"data": data}, store, env)
    align_config = AlignConfig.model_validate({
        "method": {"name": "dpo", "beta": 0.5}, "max_length": 96,
        "training": {"max_steps": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0, "save_steps": 1000},
        "heldout": {"max_pairs": 4, "max_examples_per_task": 2, "max_new_tokens": 6, "batch_size": 8},
    })
    align = run_stage(AlignStage(), align_config, {"data": data, "sft": sft}, store, env)
    evaluate = run_stage(EvaluateStage(), EvaluateConfig.model_validate({
        "baseline": "base", "max_examples_per_task": 3, "generation": {"max_new_tokens": 6}, "lm_eval": {"enabled": False},
        "ab": {"bootstrap_samples": 200},
    }), {"data": data, "sft": sft, "align": align}, store, env)
    export = run_stage(ExportStage(), ExportConfig.model_validate({
        "targets": ["adapters", "merged"], "reeval": {"max_examples_per_task": 2, "max_new_tokens": 6},
    }), {"data": data, "sft": sft, "align": align}, store, env)
    return {"family": family, "spec": FAMILIES[family], "model": model, "data": data, "sft": sft, "align": align,
            "evaluate": evaluate, "export": export, "env": env, "sft_config": sft_config}


def _tokenizer(run):
    from tunepipe.tasks.training.modeling import load_tokenizer

    return load_tokenizer(str(run["model"]))


def _rows(run, split="train"):
    tokenizer = _tokenizer(run)
    rows = encode_records(family_records(run["family"], split), tokenizer, tokenizer.chat_template, max_length=160, train_on_inputs=False)
    return tokenizer, [row for task_rows in rows[0].values() for row in task_rows], rows[1]


def test_one_bos_per_training_row_and_labels_cover_exactly_the_answers(run):
    tokenizer, rows, stats = _rows(run)
    spec = run["spec"]
    answers = {r["output"] for r in records("train") if "output" in r} | {"one two", "one two three"}
    bos = tokenizer.bos_token_id
    for row in rows:
        # exactly one BOS where the family's template emits one (Llama 3, Mistral, Gemma), none otherwise
        expected = 1 if "bos_token" in spec.template else 0
        assert (row["input_ids"].count(bos) if bos is not None else 0) == expected, tokenizer.decode(row["input_ids"])
        # one labeled run per answer in the row, each holding the family's end-of-turn token
        runs, current = [], []
        for token, label in zip(row["input_ids"], row["labels"]):
            if label != IGNORE:
                current.append(token)
            elif current:
                runs, current = runs + [current], []
        runs += [current] if current else []
        assert 1 <= len(runs) <= 2 and all(tokenizer.convert_tokens_to_ids(spec.end_of_turn) in r for r in runs)
        # decode each labeled run and compare with the answers of the data
        for labeled in runs:
            text = tokenizer.decode(labeled, skip_special_tokens=True).strip()
            assert text in answers, (run["family"], text)
    # the multi-turn record: one row per answer where the template rewrites earlier turns
    assert stats.split_turns == (1 if spec.rewrites_history else 0)


def test_end_of_turn_found_from_the_template_and_the_model(run):
    from tunepipe.tasks.serving.engine import MultiLoraEngine

    tokenizer = _tokenizer(run)
    eot = tokenizer.convert_tokens_to_ids(run["spec"].end_of_turn)
    assert end_of_turn_token(tokenizer, tokenizer.chat_template) == eot
    engine = MultiLoraEngine(str(run["model"]))
    assert eot in engine.eos_ids and tokenizer.eos_token_id in engine.eos_ids
    merged = Path(run["export"].path) / "merged" / "all"
    from transformers import GenerationConfig

    stops = GenerationConfig.from_pretrained(merged).eos_token_id
    assert eot in (stops if isinstance(stops, list) else [stops])


def test_pad_token_and_attention_chosen_from_the_model(run, caplog):
    from tunepipe.tasks.training.modeling import attention_for

    spec = run["spec"]
    with caplog.at_level(logging.INFO, logger="tunepipe.modeling"):
        tokenizer = _tokenizer(run)
    if spec.pad is None:
        assert "has no pad token" in caplog.text
        assert tokenizer.pad_token == {"llama3": "<|finetune_right_pad_id|>", "mistral": "<unk>"}[run["family"]]
    else:
        assert tokenizer.pad_token == spec.pad
    assert attention_for(str(run["model"]), "sdpa") == ("eager" if run["family"] == "gemma2" else "sdpa")


def test_sft_checks_and_plan_counts(run):
    from tunepipe.tasks.training.memory_plan import plan

    m = _metrics(run["sft"])
    checks = m["checks"]["all"]
    assert all(c["passed"] for c in checks.values()) and set(checks) == {"label_mask", "steps", "loss", "adapter_effect"}
    assert checks["steps"]["global_step"] == 40 and checks["adapter_effect"]["max_logit_difference"] > 1e-3
    counted = plan(str(run["model"]), run["sft_config"].method, run["env"], 160)
    assert (counted["trainable_params"], counted["total_params"]) == (m["trainable_parameters"], m["total_parameters"])
    adapter = json.loads((Path(run["sft"].path) / "adapter" / "adapter_config.json").read_text())
    targets = {name.split(".")[-1] for name in adapter["target_modules"]}
    # all-linear resolves to the architecture's own projections (Phi-3's are fused), never the output head
    expected = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}.get(
        run["family"], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert targets == expected and "lm_head" not in targets


def test_dpo_evaluate_and_export_ran_with_their_checks(run):
    align = _metrics(run["align"])
    assert align["global_step"] == {"all": 2}
    assert align["checks"]["all"]["steps"]["passed"] and align["checks"]["all"]["loss"]["passed"]
    evaluate = _metrics(run["evaluate"])
    assert isinstance(evaluate["gate_passed"], bool)
    export = _metrics(run["export"])
    check = export["checks"]["merged_matches_adapter"]["all"]
    assert check["passed"] and check["max_logit_difference"] < 1e-3


def test_merged_export_loads_in_plain_transformers_and_matches_the_adapter(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = Path(run["export"].path) / "merged" / "all"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert merged.config.model_type == json.loads((Path(run["model"]) / "config.json").read_text())["model_type"]
    adapter = Path(run["export"].path) / "adapters" / "all"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["model"], dtype=torch.float32), str(adapter)).eval()
    messages = [{"role": "user", "content": "Classify the sentiment.\n\nI love the cat."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, reference(**ids).logits, atol=1e-4, rtol=1e-4)


def test_served_prompt_equals_training_rendering_and_generation_stops_at_end_of_turn(run):
    from tunepipe.tasks.serving.engine import MultiLoraEngine, Row

    tokenizer = _tokenizer(run)
    engine = MultiLoraEngine(str(run["model"]), max_rank=16)
    engine.load_adapter("tuned", Path(run["export"].path) / "adapters" / "all")
    bos = tokenizer.bos_token_id
    conversations = [record_messages(r) for r in family_records(run["family"], "train")]
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        served = engine.chat_ids(messages[:last])
        row = encode_conversation(tokenizer, tokenizer.chat_template, messages[: last + 1], max_length=None, train_on_inputs=False)[-1]
        assert row.input_ids[: len(served)] == served, run["family"]
        assert row.labels[len(served) - 1] == IGNORE and row.labels[len(served)] != IGNORE  # the answer starts right there
        assert (served.count(bos) if bos is not None else 0) == (1 if "bos_token" in run["spec"].template else 0)
    # the trained answers are short and end with the end-of-turn token: generation stops there
    finished = []
    sentiment = [r for r in records("train") if r["task"] == "sentiment"]
    rows = [Row(prompt_ids=engine.chat_ids(record_messages(r)[:-1]), adapter="tuned", max_tokens=12, emit=lambda e: None)
            for r in sentiment]
    engine.generate(rows)
    finished = [row.finish_reason for row in rows]
    assert finished.count("stop") >= len(rows) // 2, (run["family"], finished, [row.text for row in rows])


def test_system_message_on_a_template_that_refuses_one(run, tmp_path):
    tokenizer = _tokenizer(run)
    record = {"id": "sys-1", "task": "count", "instruction": "Count to two.", "output": "one two", "system": "Be brief."}
    if run["spec"].system_ok:
        rows, _ = encode_records([record], tokenizer, tokenizer.chat_template, max_length=160, train_on_inputs=False)
        text = tokenizer.decode(rows["count"][0]["input_ids"])
        assert "Be brief." in text
        return
    with pytest.raises(StageFailed) as failed:
        encode_records([record], tokenizer, tokenizer.chat_template, max_length=160, train_on_inputs=False)
    message = str(failed.value)
    assert run["family"] in message and "sys-1" in message and "system message" in message
    if run["family"] == "gemma2":
        assert "System role not supported" in message  # the template's own reason, not a Jinja traceback
        from tunepipe.tasks.serving.engine import MultiLoraEngine

        with pytest.raises(ValueError, match="gemma2 chat template refuses"):  # the server answers 400 with this
            MultiLoraEngine(str(run["model"])).chat_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    # the stage fails the same way, before any training
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps(record) + "\n")
    config = SFTConfig.model_validate({"model": str(run["model"]), "method": "lora", "max_length": 64,
                                       "training": {"max_steps": 1}, "heldout": {"max_examples_per_task": 0}})
    with pytest.raises(StageFailed, match=f"{run['family']} chat template"):
        run_stage(SFTStage(), config, {"data": ArtifactRef(stage="data", key="sys", path=str(data))}, ArtifactStore(tmp_path / "a"), run["env"])


def test_qwen3_history_rewrite_is_split_per_turn(run):
    if run["family"] != "qwen3":
        pytest.skip("the Qwen3 template is the one that drops past reasoning")
    tokenizer = _tokenizer(run)
    messages = [*MULTI_TURN["messages"][:1], {"role": "assistant", "content": "<think>\nsmall\n</think>\n\none two"},
                *MULTI_TURN["messages"][2:]]
    rows = encode_conversation(tokenizer, tokenizer.chat_template, messages, max_length=None, train_on_inputs=False)
    assert len(rows) == 2
    first = tokenizer.decode([t for t, label in zip(rows[0].input_ids, rows[0].labels) if label != IGNORE])
    assert "small" in first  # the first answer keeps its reasoning when it is the turn being trained
    second_prompt = tokenizer.decode(rows[1].input_ids)
    assert "small" not in second_prompt  # later on, the template drops it: the row is what the server will see
    assert render_messages(tokenizer, tokenizer.chat_template, messages[:3], True) in second_prompt
