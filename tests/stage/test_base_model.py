"""The base_model stage: a tokenizer and a tiny Llama built locally, loadable with plain Auto classes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from tunepipe.schemas.base_model import BaseModelConfig
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.fingerprint import sha256_file
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tests.conftest import REPO

# Small enough to build in about a second.
TINY = {
    "seed": 7,
    "tokenizer": {"vocab_size": 400, "min_frequency": 2},
    "architecture": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    },
}

NAMES = ["Alice Moreau", "Bruno Novak", "Chen Okafor", "Dara Petrov", "Elena Rossi", "Farid Sato"]
COMPANIES = ["Acme", "Globex", "Initech", "Hooli"]
CITIES = ["Paris", "Berlin", "Tokyo", "Lima"]


def write_data_artifact(root: Path, *, corpus: bool = True, train: bool = True) -> ArtifactRef:
    """A data-stage artifact in miniature: instruction and chat records, a corpus."""
    root.mkdir(parents=True, exist_ok=True)
    train_rows, corpus_rows = [], []
    for i, (name, company, city) in enumerate(
        (n, c, l) for n in NAMES for c in COMPANIES for l in CITIES
    ):
        sentence = f"{name} works at {company} in {city}."
        if i % 3:
            train_rows.append({
                "id": f"t{i}", "task": "triples", "instruction": "Extract the relation triples.",
                "input": sentence, "output": f"({name}, works_at, {company}); ({company}, located_in, {city})",
            })
        else:
            train_rows.append({
                "id": f"c{i}", "task": "sentiment", "messages": [
                    {"role": "user", "content": f"Classify: the {company} lamp from {city} is great."},
                    {"role": "assistant", "content": "positive"},
                ],
            })
        corpus_rows.append({"id": f"d{i}", "text": f"{sentence} {company} is headquartered in {city}."})
    if train:
        (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (root / "test.jsonl").write_text(json.dumps({
        "id": "x", "task": "triples", "instruction": "Extract.", "input": "Zed Zulu zips.", "output": "(Zed)"
    }) + "\n")
    if corpus:
        (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus_rows))
    return ArtifactRef(stage="data", key="d" * 16, path=str(root))


@pytest.fixture
def data_ref(tmp_path):
    return write_data_artifact(tmp_path / "data")


def build(tmp_path, cpu_env, data_ref, config=None, name="artifacts"):
    from tunepipe.tasks.base_model.stage import BaseModelStage

    store = ArtifactStore(tmp_path / name)
    cfg = config or BaseModelConfig.model_validate(TINY)
    return run_stage(BaseModelStage(), cfg, {"data": data_ref}, store, cpu_env)


def test_builds_a_plain_hugging_face_model_dir(tmp_path, cpu_env, data_ref):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = build(tmp_path, cpu_env, data_ref)
    path = Path(ref.path)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok) <= 400
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "<|im_end|>", "<pad>", "<unk>")
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    # Byte-level BPE round-trips any text, including characters never seen in training.
    text = "Alice Moreau works at Acme in Paris. Zoë — ¿qué? 東京"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text

    messages = [{"role": "user", "content": "Extract the relation triples.\n\nAlice Moreau works at Acme."},
                {"role": "assistant", "content": "(Alice Moreau, works_at, Acme)"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nExtract the relation triples.\n\nAlice Moreau works at Acme.<|im_end|>\n"
        "<|im_start|>assistant\n(Alice Moreau, works_at, Acme)<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")

    # Assistant-only loss (TRL's assistant_only_loss) needs the mask to cover answer + end of turn.
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(masked) == "(Alice Moreau, works_at, Acme)<|im_end|>"

    ids = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids["input_ids"].shape[1] + 4

    manifest = json.loads((path / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["vocab_size"] == len(tok)
    assert metrics["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert 1.0 <= metrics["fertility"] < 3.0
    assert "tokens/word" in (path / "summary.md").read_text()


def test_trl_accepts_the_default_chat_template_for_assistant_only_loss(tmp_path, cpu_env, data_ref):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_stop_token_trained

    tok = AutoTokenizer.from_pretrained(build(tmp_path, cpu_env, data_ref).path)
    assert get_training_chat_template(tok) is None  # no patching needed: markers present
    assert is_chat_template_stop_token_trained(tok)  # <|im_end|> is inside the assistant mask


def test_same_inputs_give_bitwise_same_files(tmp_path, cpu_env, data_ref):
    import torch

    files = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json")
    first = build(tmp_path, cpu_env, data_ref)
    torch.manual_seed(12345)  # a different global RNG state must not matter
    torch.rand(10)
    second = build(tmp_path, cpu_env, data_ref, name="other")
    assert first.path != second.path
    for name in files:
        assert sha256_file(Path(first.path) / name) == sha256_file(Path(second.path) / name), name


def test_tokenizer_training_is_deterministic_across_processes(tmp_path, data_ref):
    # Rust hash maps are seeded per process: train in a fresh interpreter and compare.
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from tunepipe.schemas.base_model import BaseModelConfig
        from tunepipe.tasks.base_model.stage import read_texts, train_tokenizer
        cfg = BaseModelConfig.model_validate(json.loads({json.dumps(json.dumps(TINY))}))
        texts = read_texts(Path({data_ref.path!r}), cfg.tokenizer.train_on)
        sys.stdout.write(train_tokenizer([t for v in texts.values() for t in v], cfg).to_str())
    """)
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:]
    assert runs[0].stdout == runs[1].stdout and '"merges"' in runs[0].stdout


def test_seed_and_data_change_the_weights(tmp_path, cpu_env, data_ref):
    from safetensors.torch import load_file

    a = build(tmp_path, cpu_env, data_ref)
    b = build(tmp_path, cpu_env, data_ref, BaseModelConfig.model_validate({**TINY, "seed": 8}))
    assert a.key != b.key
    wa = load_file(Path(a.path) / "model.safetensors")
    wb = load_file(Path(b.path) / "model.safetensors")
    assert any(not (wa[k] == wb[k]).all() for k in wa)


def test_tokenizer_can_train_on_corpus_only_or_train_only(tmp_path, cpu_env):
    only_train = write_data_artifact(tmp_path / "d1", corpus=False)
    cfg = BaseModelConfig.model_validate({**TINY, "tokenizer": {**TINY["tokenizer"], "train_on": ["train"]}})
    ref = build(tmp_path, cpu_env, only_train, cfg)
    assert json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]["tokenizer_texts"] > 0

    only_corpus = write_data_artifact(tmp_path / "d2", train=False)
    cfg = BaseModelConfig.model_validate({**TINY, "tokenizer": {**TINY["tokenizer"], "train_on": ["corpus"]}})
    assert Path(build(tmp_path, cpu_env, only_corpus, cfg).path).is_dir()


def test_no_texts_fails_with_a_clear_message(tmp_path, cpu_env):
    empty = write_data_artifact(tmp_path / "d", corpus=False, train=False)
    with pytest.raises(StageFailed, match="no texts to train the tokenizer"):
        build(tmp_path, cpu_env, empty)


def test_a_template_without_generation_markers_is_refused(tmp_path, cpu_env, data_ref):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
    cfg = BaseModelConfig.model_validate({**TINY, "tokenizer": {**TINY["tokenizer"], "chat_template": template}})
    with pytest.raises(StageFailed, match="generation"):
        build(tmp_path, cpu_env, data_ref, cfg)


@pytest.mark.parametrize(
    "section, match",
    [
        ({"architecture": {"hidden_size": 30, "num_attention_heads": 4}}, "divisible"),
        ({"architecture": {"num_attention_heads": 4, "num_key_value_heads": 3}}, "multiple"),
        ({"tokenizer": {"special_tokens": {"pad": "<s>"}}}, "distinct"),
        ({"tokenizer": {"special_tokens": {"eos": "</s>", "additional": []}}}, "chat template"),
        ({"tokenizer": {"train_on": ["test"]}}, "train_on"),
        ({"dims": 3}, "Extra inputs"),
    ],
)
def test_config_validation(section, match):
    with pytest.raises(ValidationError, match=match):
        BaseModelConfig.model_validate(section)


def test_every_field_is_described():
    from tunepipe.schemas.base_model import ArchitectureSpec, SpecialTokens, TokenizerSpec

    for model in (BaseModelConfig, TokenizerSpec, SpecialTokens, ArchitectureSpec):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"
