"""The evaluate stage on real adapters: a candidate that learned the task is promoted with its
interval, a worse one is rejected with the rule that failed; lm-eval on the generated local task
agrees with the stage's own exact match; generation and judging through a real
OpenAI-compatible HTTP server give the same verdict as in-process generation."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.evaluate import EvaluateConfig
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.evaluate.stage import EvaluateStage
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.lm.metrics import normalise
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tests.helpers.training import WORDS, build_tiny_model, cpu_profile

torch.set_num_threads(1)

SUBJECTS = sorted(set(WORDS))


def first_word_match(prediction: str, reference: str) -> float:
    """A user metric (imported by the stage as tests.stage.test_evaluate:first_word_match)."""
    return float(prediction.split()[:1] == reference.split()[:1])


def _sentiment_data(path: Path) -> ArtifactRef:
    """A trivially learnable task (love → positive, hate → negative) and an untrained one (count)."""
    sentiment = [
        {"id": f"{label}-{w}", "task": "sentiment", "instruction": "Classify the sentiment.", "input": f"I {verb} the {w}.", "output": label}
        for w in SUBJECTS for verb, label in (("love", "positive"), ("hate", "negative"))
    ]
    count = [{"id": f"count-{i}", "task": "count", "instruction": "Count to three.", "input": "", "output": "one two three"} for i in range(6)]
    path.mkdir(parents=True)
    splits = {"train": sentiment + count, "validation": sentiment[::5], "test": sentiment[1::3] + count}
    for split, rows in splits.items():
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ArtifactRef(stage="data", key="evaldata", path=str(path))


def _sft(model: Path, data: ArtifactRef, store: ArtifactStore, *, steps: int, lr: float) -> ArtifactRef:
    config = SFTConfig.model_validate({
        "model": str(model), "tasks": ["sentiment"], "max_length": 64,
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "modules_to_save": ["lm_head"]},
        "training": {"max_steps": steps, "learning_rate": lr, "lr_scheduler": "constant", "warmup_ratio": 0.0, "save_steps": 1000},
        "heldout": {"max_examples_per_task": 0},
    })
    return run_stage(SFTStage(), config, {"data": data}, store, cpu_profile(per_device_batch_size=16))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    store = ArtifactStore(root / "artifacts")
    model = build_tiny_model(root / "llama")
    data = _sentiment_data(root / "data")
    return {
        "root": root, "store": store, "model": model, "data": data,
        "good": _sft(model, data, store, steps=60, lr=3e-3),
        # Deliberately worse: one step at a learning rate that leaves the model at its base.
        "bad": _sft(model, data, store, steps=1, lr=1e-9),
    }


def _evaluate(assets, sft: str, **config) -> tuple[ArtifactRef, dict]:
    settings = {"max_examples_per_task": 16, "generation": {"max_new_tokens": 6}, "lm_eval": {"enabled": False},
                "ab": {"bootstrap_samples": 2000}, **config}
    ref = run_stage(EvaluateStage(), EvaluateConfig.model_validate(settings), {"data": assets["data"], "sft": assets[sft]},
                    assets["store"], cpu_profile())
    return ref, json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def promoted(assets):
    return _evaluate(
        assets, "good", baseline="base", regression={"tasks": ["count"]}, lm_eval={"enabled": True},
        user_metrics={"first_word": "tests.stage.test_evaluate:first_word_match"},
    )


def test_better_candidate_is_promoted_with_its_interval(promoted):
    ref, m = promoted
    assert m["gate_passed"] is True, m["gate_reasons"]
    assert (m["candidate"], m["baseline"], m["baseline_kind"]) == ("sft", "base", "base")
    sentiment = m["tasks"]["sentiment"]
    assert sentiment["n"] == 16 and sentiment["candidate"]["exact_match"] >= 0.9 > 0.1 >= sentiment["baseline"]["exact_match"]
    assert set(sentiment["candidate"]) == {"exact_match", "token_f1", "rouge_l", "bleu", "chrf", "first_word"}
    assert m["win_rate_ci_low"] > 0.5 and m["wins"] >= 14 and m["sign_test_p_value"] < 0.001
    win_reason = next(r for r in m["gate_reasons"] if "win rate lower bound" in r)
    assert win_reason.startswith("PASS") and f"95% CI [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}]" in win_reason
    assert all(r.startswith("PASS") for r in m["gate_reasons"]) and len(m["gate_reasons"]) == 3
    # The forgetting check ran on the task not trained on.
    assert m["regression"]["count"]["source"] == "test split (token_f1)" and m["regression"]["count"]["n"] == 6

    root = Path(ref.path)
    report = (root / "report.md").read_text()
    assert "**PROMOTE**" in report and "| sentiment | exact_match |" in report and "## Examples" in report
    assert (root / "summary.md").read_text() == report  # the Prefect UI's markdown artifact is the report
    assert "<table>" in (root / "report.html").read_text()
    for png in ("task_metrics.png", "ab.png"):
        assert (root / png).read_bytes()[:4] == b"\x89PNG"
    assert len((root / "predictions.jsonl").read_text().splitlines()) == 16 + 6


def test_lm_eval_on_the_generated_task_agrees_with_the_stage(promoted):
    # The candidate is near-perfect and the base near-zero: both figures are compared, and every answer.
    ref, m = promoted
    root = Path(ref.path)
    agreement = m["lm_eval_agreement"]["sentiment"]
    assert agreement["lm_eval_exact_match"] == agreement["stage_exact_match"] == m["tasks"]["sentiment"]["candidate"]["exact_match"]
    figures = m["lm_eval"]["tunepipe_sentiment"]
    assert figures["baseline"]["exact_match,normalised"] == m["tasks"]["sentiment"]["baseline"]["exact_match"]
    # Not only the figure: lm-eval's answer to every prompt is the stage's answer, as lm-eval's filter
    # normalises it (the task's scoring normalisation: SQuAD by default).
    stage = [r for r in map(json.loads, (root / "predictions.jsonl").read_text().splitlines()) if r["task"] == "sentiment"]
    lm_eval = json.loads((root / "lm_eval_results.json").read_text())["samples"]
    for side in ("candidate", "baseline"):
        by_prompt = {s["doc"]["prompt"]: s["prediction"] for s in lm_eval[side]["tunepipe_sentiment"]}
        assert [by_prompt[r["prompt"]] for r in stage] == [normalise(r[side], "squad") for r in stage]
    kept = root / "lm_eval_tasks"
    assert (kept / "tunepipe_sentiment.yaml").exists() and "data_files:\n    test: tunepipe_sentiment.jsonl" in (kept / "tunepipe_sentiment.yaml").read_text()


def test_worse_candidate_is_rejected_with_a_reason(assets):
    _, m = _evaluate(assets, "bad", baseline=assets["good"].path)
    assert m["gate_passed"] is False
    assert m["losses"] >= 14 and m["win_rate_ci_high"] < 0.5
    win = next(r for r in m["gate_reasons"] if "win rate lower bound" in r)
    drop = next(r for r in m["gate_reasons"] if "max task metric drop" in r)
    assert win.startswith("FAIL win rate lower bound") and "<= 0.5" in win
    assert drop.startswith("FAIL") and "on sentiment" in drop
    assert any(r.startswith("SKIP max forgetting drop") for r in m["gate_reasons"])  # no regression tasks here
    assert m["baseline_kind"] == "adapter" and m["baseline"] == assets["good"].path


def test_wrong_inputs_fail_with_what_to_fix(assets):
    with pytest.raises(StageFailed, match="no `reward` input"):
        _evaluate(assets, "good", ab={"judge": "reward_model"})
    with pytest.raises(StageFailed, match=r"regression.tasks \['sentiment'\] were trained on"):
        _evaluate(assets, "good", tasks=None, regression={"tasks": ["sentiment"]})
    with pytest.raises(StageFailed, match="same model"):
        _evaluate(assets, "good", baseline="sft")


# --------------------------------------------------------------------------------------------
# A real OpenAI-compatible server: completions from the same models, and a judge model


class _Server:
    """/v1/completions answers with greedy HF generation (model name → spec); /v1/chat/completions
    is a judge that prefers the answer equal to the reference. Every payload is recorded."""

    def __init__(self, generator, specs: dict):
        self.payloads: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.payloads.append({"path": self.path, **payload})
                if self.path.endswith("/completions") and "chat" not in self.path:
                    texts = generator.answers(specs[payload["model"]], payload["prompt"])
                    body = {"id": "c", "object": "text_completion", "created": 0, "model": payload["model"],
                            "choices": [{"index": i, "text": t, "finish_reason": "stop", "logprobs": None} for i, t in enumerate(texts)]}
                else:
                    body = {"id": "j", "object": "chat.completion", "created": 0, "model": payload["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": _judge(payload["messages"][-1]["content"])}}]}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def _judge(text: str) -> str:
    section = lambda name: text.split(f"[{name}]\n", 1)[1].split("\n\n[", 1)[0].split("\n\nWhich", 1)[0].strip()
    reference, a, b = section("Reference answer"), section("Answer A"), section("Answer B")
    return "A" if a == reference != b else "B" if b == reference != a else "TIE"


def test_endpoint_generation_and_judge_give_the_in_process_verdict(assets, promoted):
    from tunepipe.tasks.evaluate.backends import HFGenerator
    from tunepipe.tasks.evaluate.sources import artifact_source, base_source

    _, in_process = promoted
    source = artifact_source("sft", assets["good"], None, None)
    generator = HFGenerator(cpu_profile(), max_new_tokens=6, batch_size=16)
    server = _Server(generator, {"good-sentiment": source.spec("sentiment"), "base": base_source(source).spec("sentiment")})
    try:
        _, m = _evaluate(
            assets, "good", baseline="base",
            generation={"backend": "endpoint", "max_new_tokens": 6, "batch_size": 8,
                        "endpoint": {"url": server.url, "candidate_model": "good-{task}", "baseline_model": "base"}},
            ab={"judge": "endpoint", "endpoint": {"url": server.url, "model": "judge"}, "bootstrap_samples": 2000},
            # The tiny base is a local model, so the general-knowledge set would be asked too (and skipped once the
            # base answers none of it): its requests are not what this test counts.
            regression={"general_set": "off"},
        )
    finally:
        server.httpd.shutdown()
    builtin = lambda scores: {k: v for k, v in scores.items() if k != "first_word"}  # the in-process run had a user metric
    for side in ("candidate", "baseline"):
        assert m["tasks"]["sentiment"][side] == builtin(in_process["tasks"]["sentiment"][side])
    assert m["gate_passed"] is True and m["ab"]["judge_requests"] == 2 * 16 and m["ab"]["judge_unparsed"] == 0
    assert (m["wins"], m["losses"]) == (in_process["wins"], in_process["losses"])
    completions = [p for p in server.payloads if p["path"] == "/v1/completions"]
    assert {p["model"] for p in completions} == {"good-sentiment", "base"} and len(completions) == 4  # 16 prompts, batches of 8
    assert all(p["add_special_tokens"] is False and p["temperature"] == 0.0 and p["max_tokens"] == 6 for p in completions)
    chats = [p for p in server.payloads if p["path"] == "/v1/chat/completions"]
    assert len(chats) == 32 and all(p["model"] == "judge" for p in chats)


def test_reward_model_judge_decides_by_the_reward_models_scores(assets, promoted):
    """A reward artifact (a one-output sequence classifier on the tiny model, as the reward stage
    saves one): each pair's outcome is the sign of the score difference, recomputed here."""
    from transformers import AutoModelForSequenceClassification

    from tunepipe.tasks.lm.pairs import render_conversation
    from tunepipe.tasks.lm.reward_model import load_reward_model, score_texts
    from tunepipe.tasks.lm.modeling import load_tokenizer

    root = assets["root"] / "reward"
    tokenizer = load_tokenizer(str(assets["model"]))
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(str(assets["model"]), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "outputs.json").write_text(json.dumps({"kind": "model", "paths": {"all": "model"}, "method": "full", "base_model": None}))
    reward = ArtifactRef(stage="reward", key="reward-k", path=str(root))

    config = EvaluateConfig.model_validate({"max_examples_per_task": 16, "generation": {"max_new_tokens": 6}, "lm_eval": {"enabled": False},
                                            "baseline": "base", "ab": {"judge": "reward_model"}, "gate": {"min_win_rate_lower_bound": None}})
    ref = run_stage(EvaluateStage(), config, {"data": assets["data"], "sft": assets["good"], "reward": reward}, assets["store"], cpu_profile())
    m = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (Path(ref.path) / "predictions.jsonl").read_text().splitlines()]
    scorer, reward_tokenizer = load_reward_model(root)
    prompt = lambda r: [{"role": "user", "content": r["prompt"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]}]
    cand = score_texts(scorer, reward_tokenizer, [render_conversation(reward_tokenizer, prompt(r), r["candidate"]) for r in rows])
    base = score_texts(scorer, reward_tokenizer, [render_conversation(reward_tokenizer, prompt(r), r["baseline"]) for r in rows])
    assert [r["outcome"] for r in rows] == ["win" if c > b else "loss" if c < b else "tie" for c, b in zip(cand, base)]
    assert m["ab"]["judge"] == "reward_model" and m["ab"]["reward_candidate_mean"] == round(sum(cand) / len(cand), 4)
    assert not any("win rate" in r for r in m["gate_reasons"])  # that rule was switched off


def test_an_aligned_candidate_beyond_its_task_tolerance_is_held_back(assets, tmp_path):
    """A planted drop: an align artifact (here the good SFT adapter under an align manifest) whose
    align stage recorded task_metric_within_tolerance false is not promoted, though it wins the A/B."""
    import shutil

    from tunepipe.schemas.manifest import ArtifactRef, Manifest

    aligned = tmp_path / "align"
    shutil.copytree(assets["good"].path, aligned)
    manifest = Manifest.model_validate_json((aligned / "manifest.json").read_text())
    manifest = manifest.model_copy(update={
        "stage": "align", "config": {**(manifest.config or {}), "task_tolerance": 0.05},
        "metrics": {"task_metric_within_tolerance": False,
                    "heldout": {"all": {"task": {"task_metric": "token_f1", "task_metric_drop": 0.3}}}},
    })
    (aligned / "manifest.json").write_text(manifest.model_dump_json())
    align_ref = ArtifactRef(stage="align", key="planted-drop", path=str(aligned))
    config = EvaluateConfig.model_validate({"max_examples_per_task": 16, "generation": {"max_new_tokens": 6},
                                            "lm_eval": {"enabled": False}, "baseline": "base"})
    ref = run_stage(EvaluateStage(), config, {"data": assets["data"], "sft": assets["good"], "align": align_ref},
                    assets["store"], cpu_profile())
    m = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]
    assert m["candidate"] == "align" and m["wins"] >= 14
    assert m["gate_passed"] is False
    assert "FAIL align kept token_f1 within its tolerance 0.05 of SFT (drop per run: all +0.300)" in m["gate_reasons"]
