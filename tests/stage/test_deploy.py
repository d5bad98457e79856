"""The deploy stage against a real running server: the embedded multi-LoRA server
(tasks/serving/embedded.py) on a real socket, talked to over HTTP by the stage.

Three adapters with different random LoRA weights stand for three trained versions (their greedy
answers differ, so what the server answers tells which version it serves). Each test builds on
the registry and server state the previous ones left, in order: promote v1, rerun (cached, no
second promotion), promote v2, a failed smoke test (rolled back to v2), an adapter the server
refuses to load (rolled back to v2), a failed gate (nothing changes), the CLI's rollback.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

from tunepipe.schemas.deploy import DeployConfig
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.tasks.core.registry import AdapterRegistry
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.deploy.stage import DeployStage
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.schemas.handoffs import ExportIndex, ExportSource, GateVerdict
from tunepipe.tasks.core.handoff import write_handoff
from tests.helpers.training import build_tiny_model, cpu_profile

torch.set_num_threads(1)

SMOKE = "Classify the sentiment. I love the dog."
MAX_TOKENS = 6


def random_adapter(base: Path, path: Path, seed: int, r: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return path


def export_artifact(root: Path, base: Path, key: str, seed: int, *, r: int = 4) -> ArtifactRef:
    """An export-shaped artifact: exports.json and one adapter under adapters/all."""
    art = root / key
    random_adapter(base, art / "adapters/all", seed, r)
    write_handoff(art, ExportIndex(
        source=ExportSource(stage="sft", key=f"sft-{key}"), kind="adapter", method="lora", base_model=str(base),
        data_key="data-v7", runs=["all"], targets={"adapters": {"all": "adapters/all"}}, engine="embedded", max_lora_rank=8,
    ))
    return ArtifactRef(stage="export", key=key, path=str(art))


def evaluate_artifact(root: Path, key: str, passed: bool, reasons: list[str]) -> ArtifactRef:
    """An evaluate-shaped artifact: its gate verdict, the one thing deploy reads of it."""
    art = root / key
    art.mkdir(parents=True, exist_ok=True)
    write_handoff(art, GateVerdict(passed=passed, reasons=reasons))
    return ArtifactRef(stage="evaluate", key=key, path=str(art))


def offline_answer(base: Path, adapter: Path) -> str:
    """What the adapter answers the smoke prompt when run directly (no server)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": SMOKE}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tunepipe.schemas.serve import ServeConfig
    from tunepipe.tasks.serving.embedded import build_app
    from tunepipe.tasks.serving.settings import resolve_serve_config
    from tunepipe.tasks.serving.process import ServerThread

    root = tmp_path_factory.mktemp("deploy")
    base = build_tiny_model(root / "base")
    registry = root / "registry"
    exports = {
        "v1": export_artifact(root / "exports", base, "v1", seed=1),
        "v2": export_artifact(root / "exports", base, "v2", seed=2),
        "v3": export_artifact(root / "exports", base, "v3", seed=3),
        "big": export_artifact(root / "exports", base, "big", seed=4, r=16),  # above the server's max rank
        "failed-gate": export_artifact(root / "exports", base, "failed-gate", seed=5),
    }
    verdicts = {name: evaluate_artifact(root / "verdicts", name, True, ["exact match 0.9 >= 0.5"]) for name in exports}
    verdicts["failed-gate"] = evaluate_artifact(root / "verdicts", "failed-gate", False, ["exact match 0.1 < 0.5"])
    answers = {k: offline_answer(base, Path(ref.path) / "adapters/all") for k, ref in exports.items() if k in ("v1", "v2", "v3")}
    assert len(set(answers.values())) == 3 and all(a.strip() for a in answers.values())
    config = ServeConfig(base=str(base), engine="embedded", allowed_adapter_dirs=[str(registry)], max_lora_rank=8, max_loras=4)
    app = build_app(resolve_serve_config(config, cpu_profile()), cpu_profile())
    with ServerThread(app) as server:
        yield {"root": root, "base": base, "registry": registry, "exports": exports, "verdicts": verdicts, "answers": answers,
               "url": server.url, "store": ArtifactStore(root / "artifacts")}


def deploy(world, export: str, inputs: dict | None = None, **config) -> ArtifactRef:
    settings = {"name": "notes", "registry": str(world["registry"]), "server_url": world["url"],
                "smoke": {"prompt": SMOKE, "max_tokens": MAX_TOKENS}, **config}
    inputs = {"export": world["exports"][export], "evaluate": world["verdicts"][export], **(inputs or {})}
    return run_stage(DeployStage(), DeployConfig.model_validate(settings), inputs, world["store"], cpu_profile())


def served_answer(world, model: str = "notes") -> str:
    client = openai.OpenAI(base_url=world["url"] + "/v1", api_key="none", max_retries=0, timeout=60)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": SMOKE}], max_tokens=MAX_TOKENS).choices[0].message.content


def served_root(world, model: str = "notes") -> str | None:
    client = openai.OpenAI(base_url=world["url"] + "/v1", api_key="none", max_retries=0, timeout=60)
    return {m.id: getattr(m, "root", None) for m in client.models.list().data}.get(model)


def metrics_of(ref: ArtifactRef) -> dict:
    return json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


def test_deploy_promotes_hot_loads_and_reruns_without_promoting_twice(world):
    registry = AdapterRegistry(world["registry"])
    ref = deploy(world, "v1")
    m = metrics_of(ref)
    assert m["decision"] == "promoted" and m["registered"] == {"notes": 1} and m["previous"] == {"notes": None}
    assert m["serving"]["notes"]["version"] == 1 and m["smoke"]["notes"]["answer"] == world["answers"]["v1"]
    assert served_answer(world) == world["answers"]["v1"]
    entry = registry.resolve("notes@prod")
    assert entry.lineage.data_key == "data-v7" and entry.lineage.source == "sft:sft-v1" and entry.base_model == str(world["base"])

    again = deploy(world, "v1")
    assert again.cached and again.key == ref.key
    forced = run_stage(DeployStage(), DeployConfig.model_validate(
        {"name": "notes", "registry": str(world["registry"]), "server_url": world["url"], "smoke": {"prompt": SMOKE, "max_tokens": MAX_TOKENS}}),
        {"export": world["exports"]["v1"], "evaluate": world["verdicts"]["v1"]}, world["store"], cpu_profile(), refresh=True)
    assert metrics_of(forced)["registered"] == {"notes": 1}
    record = registry.list()["notes"]
    assert [v.version for v in record.versions] == [1] and record.alias_history == {"prod": [1]}

    m2 = metrics_of(deploy(world, "v2"))
    assert m2["registered"] == {"notes": 2} and m2["previous"] == {"notes": 1} and m2["serving"]["notes"]["version"] == 2
    assert served_answer(world) == world["answers"]["v2"]  # hot-swapped: same server, no restart
    assert served_root(world) == registry.resolve("notes@2").path


@pytest.mark.parametrize("case", ["smoke-regex", "unloadable"])
def test_failed_deployment_rolls_back_and_the_previous_version_keeps_serving(world, case):
    registry = AdapterRegistry(world["registry"])
    export, config, message = {
        "smoke-regex": ("v3", {"smoke": {"prompt": SMOKE, "max_tokens": MAX_TOKENS, "expect_regex": "^positive$"}}, "does not match"),
        "unloadable": ("big", {}, "load_lora_adapter"),
    }[case]
    with pytest.raises(StageFailed, match=message) as failure:
        deploy(world, export, **config)
    assert "notes@prod serves version 2 again" in str(failure.value)
    assert registry.resolve("notes@prod").version == 2 and registry.list()["notes"].alias_history["prod"] == [1, 2]
    assert served_answer(world) == world["answers"]["v2"] and served_root(world) == registry.resolve("notes@2").path
    last = registry.index().events[-1]
    assert last.action == "rollback" and last.version == 2 and message in last.reason


def test_failed_gate_does_not_promote_and_says_why(world):
    registry = AdapterRegistry(world["registry"])
    versions = [v.version for v in registry.list()["notes"].versions]
    m = metrics_of(deploy(world, "failed-gate"))
    assert m["decision"] == "not_promoted" and m["gate_reasons"] == ["exact match 0.1 < 0.5"]
    assert m["serving"] == {"notes": {"version": 2, "path": registry.resolve("notes@2").path}}
    assert [v.version for v in registry.list()["notes"].versions] == versions
    # The verdict is the evaluate artifact's, whatever export is deployed with it.
    evaluate = evaluate_artifact(world["root"] / "verdicts", "judge-failed", False, ["judge win rate 0.40 < 0.55"])
    m = metrics_of(deploy(world, "v3", inputs={"evaluate": evaluate}))
    assert m["decision"] == "not_promoted" and m["gate_reasons"] == ["judge win rate 0.40 < 0.55"]
    assert served_answer(world) == world["answers"]["v2"]
    # No evaluate stage: nothing is promoted unless the config says so.
    no_gate = run_stage(
        DeployStage(), DeployConfig.model_validate({"name": "notes", "registry": str(world["registry"]), "server_url": world["url"]}),
        {"export": world["exports"]["v3"]}, world["store"], cpu_profile(),
    )
    m = metrics_of(no_gate)
    assert m["decision"] == "not_promoted" and "no gate verdict" in m["gate_reasons"][0]
    assert json.loads((Path(no_gate.path) / "deployment.json").read_text())["decision"] == "not_promoted"


def test_unreachable_server_changes_nothing(world):
    registry = AdapterRegistry(world["registry"])
    before = registry.index().model_dump()
    with pytest.raises(StageFailed, match="not reachable.*nothing was changed"):
        deploy(world, "v3", server_url="http://127.0.0.1:9", timeout_s=5)
    assert registry.index().model_dump() == before


def test_cli_rollback_and_promote_hot_swap_the_running_server(world, capsys):
    import argparse

    from tunepipe.flows.cli.registry import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    run = lambda *argv: (args := parser.parse_args(["registry", "--root", str(world["registry"]), *argv])).func(args)

    assert run("rollback", "notes", "--server", world["url"]) == 0
    assert AdapterRegistry(world["registry"]).resolve("notes@prod").version == 1
    assert served_answer(world) == world["answers"]["v1"]
    assert run("promote", "notes", "2", "--server", world["url"]) == 0
    assert served_answer(world) == world["answers"]["v2"]
    assert run("list", "--json") == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert listed["notes"]["aliases"] == {"prod": 2} and [v["version"] for v in listed["notes"]["versions"]] == [1, 2, 3, 4]
