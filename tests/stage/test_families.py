"""Real model families end to end: Llama 3.1, Qwen2.5, Qwen3, Mistral v0.3, Gemma 2, Gemma 3, Phi-3.

For each family (tests/helpers/families.py: the family's real config class, its special tokens
and its published chat template), one module-scoped run per family goes data → sft (LoRA;
QLoRA for Llama 3 and Phi-3) → DPO → evaluate → export (adapters + merged) → the embedded
server, and the tests check on values what breaks fine-tuning of that family in practice:
BOS count, label spans, the end-of-turn token, the served prompt against the training rows,
template refusals, history-rewriting templates, `tunepipe plan` counts, defaults chosen from
the model, evaluate's figures against what the served adapter answers, the merged export in
`lm_eval --model hf`. Tests marked `vllm` serve each family's base with its exported adapter on
real vLLM (the CPU build; one server per family, started once) and hold it to the training
rendering, one BOS, the end-of-turn stop and the embedded engine's greedy answers. The real pretrained
model (SmolLM2-135M-Instruct, its real tokenizer and template) is a row of its own at the end: tokenizer,
template, label mask and served prompt only (tests/e2e/test_real_model.py trains it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import openai
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
from tunepipe.tasks.lm.encoding import (
    IGNORE,
    encode_conversation,
    encode_records,
    end_of_turn_token,
    final_answer,
    reasoning_end,
    record_messages,
    render_messages,
)
from tunepipe.tasks.serving.engine import Row
from tests.helpers.families import FAMILIES, family_model
from tests.helpers.training import WORDS, cpu_profile, records
from tests.helpers.vllm import vllm_python_or_skip

torch.set_num_threads(1)

QLORA = {"llama3", "phi3"}  # QLoRA (4-bit NF4 base) for these, LoRA for the others
# Longest generated answer: 6 tokens of Qwen3's are its empty think block ("<think>", "\n", "\n", "</think>", "\n",
# "\n" here) before the answer starts.
NEW_TOKENS = 12
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
    _prestart_vllm(request, family)  # vLLM's start-up overlaps this family's training (only when its vLLM tests run)
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
        "heldout": {"max_pairs": 4, "max_examples_per_task": 2, "max_new_tokens": NEW_TOKENS, "batch_size": 8},
    })
    align = run_stage(AlignStage(), align_config, {"data": data, "sft": sft}, store, env)
    evaluate = run_stage(EvaluateStage(), EvaluateConfig.model_validate({
        "baseline": "base", "max_examples_per_task": 3, "generation": {"max_new_tokens": NEW_TOKENS}, "lm_eval": {"enabled": True},
        "ab": {"bootstrap_samples": 200},
        # The families' tiny bases count as pretrained (not built by the pipeline), so the general-knowledge set is
        # asked too where a base answers any of it by chance (Mistral's "seven seven ..."): at the same length as the
        # tasks, so every row of predictions.jsonl is what the served models answer in NEW_TOKENS tokens.
        "regression": {"general_max_new_tokens": NEW_TOKENS},
    }), {"data": data, "sft": sft, "align": align}, store, env)
    export = run_stage(ExportStage(), ExportConfig.model_validate({
        "targets": ["adapters", "merged"], "reeval": {"max_examples_per_task": 2, "max_new_tokens": NEW_TOKENS},
    }), {"data": data, "sft": sft, "align": align}, store, env)
    return {"family": family, "spec": FAMILIES[family], "model": model, "data": data, "sft": sft, "align": align,
            "evaluate": evaluate, "export": export, "env": env, "sft_config": sft_config}


def _tokenizer(run):
    from tunepipe.tasks.lm.modeling import load_tokenizer

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
        # (Qwen3's template puts an empty think block before each final answer: it is learned with the answer,
        # so the model emits it when served as the template renders, and the answer is what follows it)
        think_end = reasoning_end(tokenizer)
        assert (think_end is not None) == (run["family"] == "qwen3")
        for labeled in runs:
            text = tokenizer.decode(labeled, skip_special_tokens=True).strip()
            assert final_answer(text, think_end) in answers, (run["family"], text)
            assert think_end is None or (text.startswith("<think>") and think_end in text), text
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
    from tunepipe.tasks.lm.modeling import attention_for

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
    for task, scores in evaluate["tasks"].items():  # lm-eval on the same prompts scored what the stage scored
        assert 1 <= scores["n"] <= 3 and set(scores["candidate"]) >= {"exact_match", "token_f1"}
        agreement = evaluate["lm_eval_agreement"][task]
        assert agreement["lm_eval_exact_match"] == agreement["stage_exact_match"] == scores["candidate"]["exact_match"], (task, agreement)
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


# --------------------------------------------------------------------------------------------
# evaluate's figures are the served adapter's answers; the merged export in lm-eval


def _predictions(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run["evaluate"].path) / "predictions.jsonl").read_text().splitlines()]


def _engine_answers(engine, tokenizer, prompts: list[str], adapter: str | None, max_tokens: int) -> list[Row]:
    """Greedy answers of the embedded engine to rendered prompts (tokenized as evaluate does: no special tokens added)."""
    from tunepipe.tasks.lm.encoding import encode_text

    rows = [Row(prompt_ids=list(encode_text(tokenizer, p)["input_ids"]), adapter=adapter, max_tokens=max_tokens, emit=lambda e: None)
            for p in prompts]
    engine.generate(rows)
    return rows


# Families whose 40 steps reach exact match 1.0 on sentiment's 3 test prompts, measured on this project's machine
# (2026-12-04): Gemma 2, 1.0 in 2026-11, now reaches 0.67 here (as on eed72af: float rounding of this CPU, as the
# PPO test showed); every family is still held to >= its base.
LEARNS_SENTIMENT = {"mistral", "gemma3", "phi3"}


def test_evaluate_figures_are_what_the_served_adapter_answers(run):
    """Every answer in evaluate's predictions is the served exported adapter's (candidate) or the base's (baseline)
    greedy answer to the same rendered prompt, and the per-task figures are those answers scored."""
    from tunepipe.tasks.serving.engine import MultiLoraEngine
    from tunepipe.tasks.lm.metrics import exact_match, token_f1

    predictions = _predictions(run)
    engine = MultiLoraEngine(str(run["model"]), max_rank=16)
    engine.load_adapter("tuned", Path(run["export"].path) / "adapters" / "all")
    prompts = [p["prompt"] for p in predictions]
    for side, adapter in (("candidate", "tuned"), ("baseline", None)):
        # the served tokens, decoded as evaluate decodes (a character cut in half at max_tokens is U+FFFD there, while a
        # streaming server holds its bytes back: the tokens are what must agree)
        rows = _engine_answers(engine, engine.tokenizer, prompts, adapter, NEW_TOKENS)
        # (Qwen3 answers after its think block, which the served text holds and evaluate's answer does not)
        think_end = reasoning_end(engine.tokenizer)
        served = [final_answer(engine.tokenizer.decode(row.tokens, skip_special_tokens=True), think_end) for row in rows]
        assert served == [p[side] for p in predictions], (run["family"], side)
    metrics = _metrics(run["evaluate"])
    for task, scores in metrics["tasks"].items():
        rows = [p for p in predictions if p["task"] == task]
        for side in ("candidate", "baseline"):
            em = sum(exact_match(p[side], p["reference"]) for p in rows) / len(rows)
            f1 = sum(token_f1(p[side], p["reference"]) for p in rows) / len(rows)
            assert scores[side]["exact_match"] == pytest.approx(em, abs=1e-4) and scores[side]["token_f1"] == pytest.approx(f1, abs=1e-4)
    # trained tasks: the candidate is never below the untrained base (which answers noise), and where 40 steps learn
    # sentiment (LEARNS_SENTIMENT) it beats it
    for task, scores in metrics["tasks"].items():
        assert scores["candidate"]["token_f1"] >= scores["baseline"]["token_f1"], (run["family"], task, scores)
    if run["family"] in LEARNS_SENTIMENT:
        sentiment = metrics["tasks"]["sentiment"]
        assert sentiment["candidate"]["exact_match"] == 1.0 > sentiment["baseline"]["exact_match"], (run["family"], sentiment)


LM_EVAL_CLI = "gemma2"  # the family run through the `lm_eval` command itself (a process: ~25 s of imports)


def test_merged_export_runs_in_lm_eval_hf(run, tmp_path):
    """lm-eval's `hf` model built from `pretrained=<merged export>` (the `lm_eval --model hf --model_args ...` command
    for one family, the same `simple_evaluate` call in-process for the others) on the task evaluate wrote into its
    artifact, offline: the merged model answers and scores what base + adapter did inside the evaluate stage."""
    tasks_dir = Path(run["evaluate"].path) / "lm_eval_tasks"
    merged = Path(run["export"].path) / "merged" / "all"
    model_args = f"pretrained={merged},dtype=float32"
    think_end = reasoning_end(_tokenizer(run))
    if think_end is not None:  # as evaluate runs lm-eval for a reasoning family: the answer after the think block is scored
        model_args += f",think_end_token={_tokenizer(run).convert_tokens_to_ids(think_end)}"
    if run["family"] == LM_EVAL_CLI:
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
        done = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--device", "cpu", "--include_path", ".",
             "--tasks", "tunepipe_sentiment", "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"],
            cwd=tasks_dir, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        figure = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["tunepipe_sentiment"]
        samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_tunepipe_sentiment_*.jsonl")).read_text().splitlines()]
    else:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        here = os.getcwd()
        os.chdir(tasks_dir)  # the artifact's task files name their data relative to their directory
        try:
            out = simple_evaluate(model="hf", model_args=model_args, device="cpu", tasks=["tunepipe_sentiment"], batch_size=4,
                                  task_manager=TaskManager(include_path=".", include_defaults=False), log_samples=True, bootstrap_iters=0)
        finally:
            os.chdir(here)
        figure, samples = out["results"]["tunepipe_sentiment"], out["samples"]["tunepipe_sentiment"]
    evaluated = json.loads((Path(run["evaluate"].path) / "lm_eval_results.json").read_text())
    # (evaluate stores figures to 4 decimals)
    assert figure["exact_match,normalised"] == pytest.approx(evaluated["figures"]["tunepipe_sentiment"]["candidate"]["exact_match,normalised"], abs=1e-4)
    expected = [(s["doc"]["prompt"], s["prediction"]) for s in evaluated["samples"]["candidate"]["tunepipe_sentiment"]]
    got = [(s["doc"]["prompt"], s["filtered_resps"][0]) for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert got == expected and len(got) >= 2, run["family"]


# --------------------------------------------------------------------------------------------
# real vLLM (the CPU build): one server per family, the family's base with its exported adapter

# Start-up, not behaviour: no torch.compile warm-up and no separate worker process (minutes saved on 2 cores).
VLLM_ARGS = ["--enforce-eager", "--distributed-executor-backend", "uni"]


class VLLMPool:
    """One vLLM server per family, each started ahead of need in a background thread (vLLM takes 1-2.5 minutes
    to become healthy on 2 cores): a family's server starts when its pipeline run starts, and the next family's
    when this one's vLLM tests begin, so start-up overlaps training and tests. At most two run at once."""

    def __init__(self, root: Path):
        self.root = root
        self.servers: dict[str, object] = {}
        self.threads: dict[str, object] = {}
        self.errors: dict[str, Exception] = {}
        self.startup_s: dict[str, float] = {}
        self.waited_s: dict[str, float] = {}

    def start(self, family: str, python: str) -> None:
        import threading

        from tunepipe.schemas.serve import ServeConfig
        from tunepipe.tasks.core.environment import load_environment
        from tunepipe.tasks.core.net import free_port
        from tunepipe.tasks.serving.settings import resolve_serve_config
        from tunepipe.tasks.serving.vllm import VLLMServer

        if family in self.threads:
            return
        model = family_model(family, self.root / "family-models")
        config = resolve_serve_config(ServeConfig(
            base=str(model), engine="vllm", port=free_port(), max_loras=1,
            vllm={"python": python, "extra_args": VLLM_ARGS, "health_timeout_s": 600},
        ), load_environment("serve-vllm-cpu"))
        server = VLLMServer(config, log_file=self.root / f"vllm-{family}.log")

        def start() -> None:
            began = time.monotonic()
            try:
                server.start()
            except Exception as exc:  # re-raised in the test that waits for it
                self.errors[family] = exc
            self.startup_s[family] = round(time.monotonic() - began, 1)

        self.servers[family] = server
        self.threads[family] = threading.Thread(target=start, name=f"vllm-{family}", daemon=True)
        self.threads[family].start()

    def wait(self, family: str):
        began = time.monotonic()
        self.threads[family].join()
        self.waited_s[family] = round(time.monotonic() - began, 1)
        if family in self.errors:
            raise self.errors[family]
        return self.servers[family]

    def stop(self, family: str) -> None:
        if family in self.servers:
            self.servers.pop(family).stop()

    def stop_all(self) -> None:
        for family in list(self.servers):
            self.threads[family].join()
            self.stop(family)


def _vllm_families(session) -> list[str]:
    """The families whose vLLM tests are selected, in the order they run."""
    wanted = [item.callspec.params.get("run") for item in session.items
              if item.get_closest_marker("vllm") and hasattr(item, "callspec")]
    return list(dict.fromkeys(f for f in wanted if f))


@pytest.fixture(scope="module")
def vllm_pool(tmp_path_factory):
    pool = VLLMPool(tmp_path_factory.getbasetemp())
    yield pool
    pool.stop_all()
    if pool.startup_s:
        print(f"\nvLLM start-up per family (s): {pool.startup_s}; waited for by the tests (s): {pool.waited_s}")


def _prestart_vllm(request, family: str) -> None:
    """Start the family's vLLM early when its vLLM tests are selected and vLLM's environment is built."""
    from tunepipe.tasks.serving.vllm_env import env_python, is_built

    if family in _vllm_families(request.session) and is_built("cpu"):
        request.getfixturevalue("vllm_pool").start(family, str(env_python("cpu")))


@pytest.fixture(scope="module")
def served(run, vllm_pool, request):
    """vLLM serving the family's base with its exported adapter loaded as `tuned`."""
    import httpx

    family = run["family"]
    python = vllm_python_or_skip()
    vllm_pool.start(family, python)
    server = vllm_pool.wait(family)
    order = _vllm_families(request.session)
    if family in order and order.index(family) + 1 < len(order):
        vllm_pool.start(order[order.index(family) + 1], python)
    adapter = Path(run["export"].path) / "adapters" / "all"
    loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "tuned", "lora_path": str(adapter)}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    # vLLM without the front answers to the base's served name only (--served-model-name), not its path
    yield {"url": server.url, "base": server.config.served_model_name, "adapter": adapter,
           "client": openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)}
    vllm_pool.stop(family)


def _vllm_chat(served, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One greedy chat completion with the token ids vLLM used and produced (its `return_token_ids` extension)."""
    reply = served["client"].chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0,
                                                     extra_body={"return_token_ids": True, "skip_special_tokens": True})
    choice = reply.choices[0]
    return {"prompt": reply.model_extra["prompt_token_ids"], "tokens": choice.model_extra["token_ids"],
            "finish": choice.finish_reason, "text": choice.message.content}


@pytest.mark.vllm
def test_vllm_prompt_is_the_training_rendering_with_one_bos_and_stops_at_end_of_turn(run, served):
    tokenizer = _tokenizer(run)
    bos, eot = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(run["spec"].end_of_turn)
    for messages in (record_messages(r) for r in family_records(run["family"], "train")):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = _vllm_chat(served, "tuned", messages[:last], 1)["prompt"]
        row = encode_conversation(tokenizer, tokenizer.chat_template, messages[: last + 1], max_length=None, train_on_inputs=False)[-1]
        assert prompt == row.input_ids[: len(prompt)] and row.labels[len(prompt)] != IGNORE, (run["family"], tokenizer.decode(prompt))
        assert (prompt.count(bos) if bos is not None else 0) == (1 if "bos_token" in run["spec"].template else 0)
    answers = [_vllm_chat(served, "tuned", record_messages(r)[:-1], 12) for r in records("train") if r["task"] == "sentiment"]
    stopped = [a for a in answers if a["finish"] == "stop"]
    assert len(stopped) >= len(answers) // 2, (run["family"], [(a["finish"], a["text"]) for a in answers])
    assert all(a["tokens"][-1] == eot for a in stopped), (run["family"], [a["tokens"] for a in stopped])  # the learned end of turn


@pytest.mark.vllm
def test_vllm_greedy_answers_equal_the_embedded_engines_and_the_adapter_is_applied(run, served):
    from tunepipe.tasks.serving.engine import MultiLoraEngine

    engine = MultiLoraEngine(str(run["model"]), max_rank=16)
    engine.load_adapter("tuned", served["adapter"])
    conversations = [record_messages(r)[:-1] for r in family_records(run["family"], "validation")]
    answers = {}
    for name, adapter in (("tuned", "tuned"), (served["base"], None)):
        vllm = [_vllm_chat(served, name, messages, 12) for messages in conversations]
        rows = [Row(prompt_ids=engine.chat_ids(m), adapter=adapter, max_tokens=12, emit=lambda e: None) for m in conversations]
        engine.generate(rows)
        for v, row in zip(vllm, rows):
            assert v["prompt"] == row.prompt_ids  # the same rendering on both engines
            produced = v["tokens"][:-1] if v["finish"] == "stop" else v["tokens"]  # vLLM lists the stop token, the engine does not
            assert (produced, v["finish"]) == (row.tokens, row.finish_reason), (run["family"], name, v["text"], row.text)
        answers[adapter] = [tuple(v["tokens"]) for v in vllm]
    differ = sum(a != b for a, b in zip(answers["tuned"], answers[None]))
    assert differ >= len(conversations) // 2, (run["family"], differ, len(conversations))


@pytest.mark.vllm
def test_vllm_answers_what_evaluate_scored(run, served):
    """The evaluate stage's candidate answers (HF, in-process) are what vLLM serving the exported adapter answers."""
    from tunepipe.tasks.evaluate.backends import completion_request

    predictions = _predictions(run)
    tokenizer = _tokenizer(run)
    for side, model in (("candidate", "tuned"), ("baseline", served["base"])):
        request = completion_request(model, [p["prompt"] for p in predictions], NEW_TOKENS)
        request["extra_body"]["return_token_ids"] = True
        reply = served["client"].completions.create(**request)
        # decoded as evaluate decodes its own tokens (see test_evaluate_figures_are_what_the_served_adapter_answers)
        texts = [final_answer(tokenizer.decode(c.model_extra["token_ids"], skip_special_tokens=True), reasoning_end(tokenizer))
                 for c in sorted(reply.choices, key=lambda c: c.index)]
        assert texts == [p[side] for p in predictions], (run["family"], side)
    # evaluate's endpoint backend on the same server reads the same answers (after Qwen3's think block too), wherever
    # no character was cut in half at the token limit (the server's text holds such bytes back, see above)
    from tunepipe.schemas.evaluate import GenerationEndpoint
    from tunepipe.tasks.evaluate.backends import EndpointGenerator
    from tunepipe.tasks.evaluate.sources import ModelSpec

    generator = EndpointGenerator(GenerationEndpoint(url=f"{served['url']}/v1", candidate_model="tuned", baseline_model="base"),
                                  max_new_tokens=NEW_TOKENS, batch_size=8)
    spec = ModelSpec("candidate", str(run["model"]), tokenizer=str(run["model"]), served_name="tuned")
    answers = generator.answers(spec, [p["prompt"] for p in predictions])
    kept = [(a, p["candidate"]) for a, p in zip(answers, predictions) if "\ufffd" not in p["candidate"]]
    assert kept and all(a == c for a, c in kept), (run["family"], kept)


# --------------------------------------------------------------------------------------------
# The real model's row: SmolLM2-135M-Instruct with its real tokenizer and published template (from its GGUF).
# Its tokenizer, template and label mask only: training the real model is the job of tests/e2e/test_real_model.py.
# SmolLM2's BOS is ChatML's `<|im_start|>`, which its template renders at every turn (and it adds a default system
# turn when there is none): a row holds one BOS per rendered turn, all the template's own. ~30 s (the model's load
# by the embedded engine).


@pytest.fixture(scope="module")
def real():
    from tunepipe.tasks.lm.modeling import load_tokenizer
    from tests.helpers.real_model import smollm2_gguf

    gguf = smollm2_gguf()
    return {"gguf": gguf, "tokenizer": load_tokenizer(gguf)}


def test_real_model_row_bos_per_turn_labels_cover_exactly_the_answers(real):
    from tunepipe.tasks.lm.encoding import label_mask_problem

    tokenizer = real["tokenizer"]
    template = tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token, end_of_turn_token(tokenizer, template)) == (
        "<|im_start|>", "<|im_end|>", tokenizer.convert_tokens_to_ids("<|im_end|>"))
    conversations = [record_messages(r) for r in [*records("train"), MULTI_TURN]]
    answers = {r["output"] for r in records("train") if "output" in r} | {"one two", "one two three"}
    for messages in conversations:
        (row,) = encode_conversation(tokenizer, template, messages, max_length=None, train_on_inputs=False)
        turns = render_messages(tokenizer, template, messages, False).count("<|im_start|>")
        assert row.input_ids.count(tokenizer.bos_token_id) == turns >= len(messages)
        assert label_mask_problem(tokenizer, template, row) is None
        runs, current = [], []
        for token, label in zip(row.input_ids, row.labels):
            if label != IGNORE:
                current.append(token)
            elif current:
                runs, current = runs + [current], []
        runs += [current] if current else []
        assert len(runs) == sum(m["role"] == "assistant" for m in messages)
        for labeled in runs:
            assert tokenizer.eos_token_id in labeled  # each answer holds its <|im_end|>: the model learns to stop
            assert tokenizer.decode(labeled, skip_special_tokens=True).strip() in answers


def test_real_model_served_prompt_is_the_training_rendering(real):
    from tunepipe.tasks.serving.engine import MultiLoraEngine

    tokenizer = real["tokenizer"]
    engine = MultiLoraEngine(str(real["gguf"]))
    for messages in (record_messages(r) for r in [*records("train"), MULTI_TURN]):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        served = engine.chat_ids(messages[:last])
        (row,) = encode_conversation(tokenizer, tokenizer.chat_template, messages[: last + 1], max_length=None, train_on_inputs=False)
        assert row.input_ids[: len(served)] == served
        assert row.labels[len(served) - 1] == IGNORE and row.labels[len(served)] != IGNORE  # the answer starts right there
