"""What ships after the gate (no models): evaluate's winner, export's pick under `source: auto`,
deploy's refusal of an export that is not the winner, and the general set's scoring."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tunepipe.schemas.deploy import DeployConfig
from tunepipe.schemas.export import ExportConfig
from tunepipe.schemas.handoffs import ExportIndex, ExportSource, GateVerdict
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.tasks.core.handoff import write_handoff
from tunepipe.tasks.deploy.stage import gate_verdict
from tunepipe.tasks.evaluate.stage import winner
from tunepipe.tasks.export.stage import pick_source
from tunepipe.tasks.lm import retention

FORGOT = "FAIL max forgetting drop 0.05: worst regression change -0.400 on general_chat (0.800 → 0.400), a drop of 0.400 > 0.05"


def _metrics(passed: bool, reasons: list[str]) -> dict:
    return {"candidate": "align", "baseline": "sft", "gate_passed": passed, "gate_reasons": reasons}


def test_the_winner_is_the_candidate_or_sft_when_align_is_held_back_or_nothing():
    assert winner("align", _metrics(True, ["PASS x"]), None)["winner"] == "align"
    shipped = winner("align", _metrics(False, ["PASS x", FORGOT]), {"gate_passed": True, "gate_reasons": ["PASS y"]})
    assert shipped["winner"] == "sft"
    assert FORGOT in shipped["winner_reason"] and "the sft adapters passed the same gate against the base" in shipped["winner_reason"]
    nothing = winner("align", _metrics(False, [FORGOT]), {"gate_passed": False, "gate_reasons": ["FAIL win rate"]})
    assert nothing["winner"] is None and "FAIL win rate" in nothing["winner_reason"] and nothing["winner_reason"].endswith("nothing ships")
    assert winner("align", _metrics(False, [FORGOT]), None)["winner"] is None
    # a path candidate that passed is not a pipeline artifact export could ship
    assert winner(None, {**_metrics(True, ["PASS"]), "candidate": "/some/adapter"}, None)["winner"] is None


def _artifact(root: Path, stage: str, key: str, handoff=None) -> ArtifactRef:
    path = root / stage / key
    path.mkdir(parents=True)
    if handoff is not None:
        write_handoff(path, handoff)
    return ArtifactRef(stage=stage, key=key, path=str(path))


def test_export_auto_takes_evaluates_winner(tmp_path):
    sft, align = _artifact(tmp_path, "sft", "s1"), _artifact(tmp_path, "align", "a1")
    held_back = GateVerdict(passed=False, reasons=[FORGOT], candidate="align", winner="sft", winner_key="s1", winner_reason="align was held back")
    evaluate = _artifact(tmp_path, "evaluate", "e1", held_back)
    picked, why = pick_source(ExportConfig(), {"sft": sft, "align": align, "evaluate": evaluate})
    assert picked.stage == "sft" and why == "evaluate's winner: align was held back"
    # an explicit source is obeyed; no evaluate input: align as before
    assert pick_source(ExportConfig(source="align"), {"sft": sft, "align": align, "evaluate": evaluate})[0].stage == "align"
    assert pick_source(ExportConfig(), {"sft": sft, "align": align})[0].stage == "align"
    none = _artifact(tmp_path, "evaluate", "e2", GateVerdict(passed=False, reasons=[], candidate="align", winner_reason="nothing ships"))
    picked, why = pick_source(ExportConfig(), {"sft": sft, "align": align, "evaluate": none})
    assert picked.stage == "align" and "deploy will not promote it" in why


def _deploy_ctx(evaluate: ArtifactRef) -> SimpleNamespace:
    return SimpleNamespace(inputs={"evaluate": evaluate})


def _export(stage: str, key: str) -> ExportIndex:
    return ExportIndex(source=ExportSource(stage=stage, key=key), kind="adapters", method="lora", base_model="/b", runs=["t"],
                       targets={"adapters": {"t": "adapters/t"}}, engine="vllm", max_lora_rank=8)


def test_deploy_promotes_only_the_winner(tmp_path):
    verdict = GateVerdict(passed=False, reasons=[FORGOT], candidate="align", winner="sft", winner_key="s1",
                          winner_reason="align was held back; sft passed", fallback_reasons=["PASS sft win rate"])
    ctx = _deploy_ctx(_artifact(tmp_path, "evaluate", "e1", verdict))
    config = DeployConfig(name="x")
    ok, reasons = gate_verdict(config, ctx, _export("sft", "s1"))
    assert ok and reasons == ["evaluate's winner sft: align was held back; sft passed", "PASS sft win rate"]
    refused, reasons = gate_verdict(config, ctx, _export("align", "a1"))
    assert not refused and "but evaluate's winner is sft:s1" in reasons[0]
    stale, _ = gate_verdict(config, ctx, _export("sft", "older"))
    assert not stale
    # a verdict from before winners existed: its `passed` decides, as it did
    old = _deploy_ctx(_artifact(tmp_path, "evaluate", "e0", GateVerdict(passed=True, reasons=["PASS"])))
    assert gate_verdict(config, old, _export("align", "a1")) == (True, ["PASS"])


def test_general_set_is_well_formed_and_scored_by_containment():
    items = retention.general_set()
    assert len(items) == 48 and len({i["id"] for i in items}) == 48
    # every accepted answer survives normalisation (an answer "A" would normalise to nothing)
    from tunepipe.tasks.lm.metrics import normalise

    assert all(normalise(answer) for item in items for answer in item["answers"])
    right = [f"I think it is {item['answers'][0]}." for item in items]
    assert retention.scores(right) == [1.0] * 48
    kept = retention.retention(right, ["no idea"] * 24 + right[24:], ("base", "trained"))
    assert kept["base"] == 1.0 and kept["trained"] == 0.5 and kept["change"] == -0.5 and len(kept["lost"]) == 24


def test_only_a_pretrained_base_is_checked(tmp_path):
    built = _artifact(tmp_path, "base_model", "b1")
    assert retention.applies("auto", built.path, {"base_model": built}) is False
    assert retention.applies("auto", str(tmp_path / "smollm2"), {"base_model": built}) is True
    assert retention.applies("off", str(tmp_path / "smollm2"), {}) is False
    assert retention.applies("on", built.path, {"base_model": built}) is True
    # continued pretraining of the pipeline's own base is still from scratch; of a pretrained model it is not
    # (the manifest as the pretrain stage writes it: its key payload, where a model is its fingerprint)
    from tunepipe.schemas.manifest import Manifest, Timings
    from tunepipe.schemas.pretrain import PretrainConfig
    from tunepipe.tasks.pretrain.stage import PretrainStage

    def manifest(config: PretrainConfig) -> str:
        return Manifest(stage="pretrain", key="p1", code_version="c", config=PretrainStage().key_payload(config),
                        timings=Timings(started_at="t0", finished_at="t1", seconds=0.0)).model_dump_json()

    pretrain = _artifact(tmp_path, "pretrain", "p1")
    (Path(pretrain.path) / "manifest.json").write_text(manifest(PretrainConfig()))
    assert retention.applies("auto", pretrain.path, {"base_model": built, "pretrain": pretrain}) is False
    (Path(pretrain.path) / "manifest.json").write_text(manifest(PretrainConfig(model="HuggingFaceTB/SmolLM2-135M")))
    assert retention.applies("auto", pretrain.path, {"base_model": built, "pretrain": pretrain}) is True


def test_align_reports_retention_sft_to_aligned_and_skips_what_sft_never_knew(monkeypatch):
    """align's general-set check on canned answers: SFT answers the set, the aligned policy lost half;
    an SFT policy that answers none of it has nothing to lose and is not reported."""
    import contextlib

    from tunepipe.tasks.align import evaluation

    items = retention.general_set()
    right = [item["answers"][0] for item in items]
    answers = {"sft": right, "aligned": right[:24] + ["I cannot say."] * 24}

    class Pair:
        @contextlib.contextmanager
        def use(self, which):
            yield which

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return messages[-1]["content"]

    monkeypatch.setattr(evaluation, "greedy_answers", lambda model, tok, prompts, **kw: answers[model][: len(prompts)])
    settings = SimpleNamespace(max_new_tokens=8, batch_size=4)
    kept = evaluation.general_retention(Pair(), Tokenizer(), settings)
    assert (kept["sft"], kept["aligned"], kept["change"], kept["n"]) == (1.0, 0.5, -0.5, 48)
    assert kept["lost"] == [item["id"] for item in items[24:]]
    answers["sft"] = ["no idea"] * 48
    assert evaluation.general_retention(Pair(), Tokenizer(), settings) is None


def test_per_task_adapters_are_checked_one_by_one_and_the_gate_names_the_one_that_forgot(monkeypatch):
    """evaluate's general-set entries with fakes for the models: one `general_chat:<task>` per adapter,
    the baseline's answers from its own adapter, and the forgetting rule failing on the adapter that lost it."""
    import logging

    from tunepipe.schemas.evaluate import EvaluateConfig, GateRules
    from tunepipe.tasks.evaluate import stage
    from tunepipe.tasks.evaluate.gate import GateEvidence, decide
    from tunepipe.tasks.evaluate.sources import ModelSource

    items = retention.general_set()
    right = [item["answers"][0] for item in items]

    class Generator:
        max_new_tokens = 6
        asked: list = []

        def answers(self, spec, prompts):
            self.asked.append((spec.label, self.max_new_tokens))
            forgot = spec.adapter is not None and spec.adapter.endswith("align/t")
            return ["I cannot say."] * len(prompts) if forgot else right

    monkeypatch.setattr("tunepipe.tasks.lm.modeling.load_tokenizer", lambda path: None)
    monkeypatch.setattr(stage, "prompt_template", lambda config, tokenizer: "")
    monkeypatch.setattr(retention, "prompts", lambda tokenizer, template, system_prompt=None: [i["prompt"] for i in items])
    candidate = ModelSource("align", "adapters", "/base", Path("/align"), {"sentiment": "s", "triples": "t"})
    baseline = ModelSource("sft", "adapters", "/base", Path("/sft"), {"sentiment": "s", "triples": "t"})
    ctx = SimpleNamespace(inputs={}, logger=logging.getLogger("test"))
    generator = Generator()
    runs = stage.general_runs(EvaluateConfig(), candidate, baseline, generator, ctx)
    assert sorted(runs) == ["general_chat:sentiment", "general_chat:triples"]
    assert generator.max_new_tokens == 6 and {n for _, n in generator.asked} == {32}  # restored after, 32 during
    # the base (adapters off) decides there is something to lose; the baseline is the sft adapter itself
    assert ("base", 32) in generator.asked and ("sft:triples", 32) in generator.asked
    scores = stage.general_scores(runs)
    assert scores["general_chat:sentiment"]["candidate"] == 1.0 and scores["general_chat:triples"]["candidate"] == 0.0
    assert scores["general_chat:triples"]["baseline"] == 1.0 and len(scores["general_chat:triples"]["lost"]) == 48
    passed, reasons = decide(GateRules(min_win_rate_lower_bound=None), GateEvidence(
        primary_metric="token_f1", win=None, judge="rule", regression={n: (r["candidate"], r["baseline"]) for n, r in scores.items()}))
    assert not passed and any(r.startswith("FAIL max forgetting drop 0.05") and "on general_chat:triples" in r for r in reasons)
    # off: nothing asked
    generator.asked.clear()
    assert stage.general_runs(EvaluateConfig(regression={"general_set": "off"}), candidate, baseline, generator, ctx) == {}
    assert generator.asked == []
