"""tasks.lm.modeling: one loading path for hub ids and local dirs, and content fingerprints for keys."""

from __future__ import annotations

import json
import shutil

import pytest

from tunepipe.tasks.lm import modeling


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + byte-level BPE tokenizer saved as a plain HF directory (no hub)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny") / "model"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["Alice works at Acme in Paris.", "Bruno works at Globex in Lima."] * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_load_tokenizer_local_sets_pad_and_template(tiny_model_dir):
    tok = modeling.load_tokenizer(tiny_model_dir)
    assert tok.pad_token == tok.unk_token == "<unk>"  # no pad in the dir: unk stands in (then eos; see choose_pad_token)
    assert tok.chat_template is None
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = modeling.load_tokenizer(str(tiny_model_dir), chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "user: hi\n"


def test_pad_token_choice_prefers_a_reserved_pad_then_unk_then_eos():
    from types import SimpleNamespace

    def tok(specials, unk=None, eos="</s>", added=()):
        return SimpleNamespace(all_special_tokens=specials, added_tokens_encoder=dict.fromkeys(added, 0), unk_token=unk, eos_token=eos)

    assert modeling.choose_pad_token(tok(["<s>"], added=["<|finetune_right_pad_id|>"]))[0] == "<|finetune_right_pad_id|>"
    assert modeling.choose_pad_token(tok(["<s>", "<unk>"], unk="<unk>"))[0] == "<unk>"
    assert modeling.choose_pad_token(tok(["<s>"]))[0] == "</s>"
    assert modeling.choose_pad_token(tok([], eos=None)) is None


def test_load_model_local_dtype_and_attention(tiny_model_dir):
    import torch

    model = modeling.load_model(tiny_model_dir)
    assert model.dtype == torch.float32 and model.config.model_type == "llama"
    model = modeling.load_model(str(tiny_model_dir), dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_unknown_names_fail_before_any_network(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        modeling.load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        modeling.model_fingerprint("no-such-dir")
    with pytest.raises(ValueError, match="unknown dtype"):
        modeling.torch_dtype("float8")


def test_quantization_config_from_environment_defaults():
    from transformers import BitsAndBytesConfig

    from tunepipe.schemas.environment import QuantizationDefaults

    q = modeling.quantization_config(QuantizationDefaults(compute_dtype="float32"))
    assert isinstance(q, BitsAndBytesConfig)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert modeling.quantization_config(QuantizationDefaults(load_in_4bit=False)) is None
    assert modeling.quantization_config(None) is None
    assert modeling.quantization_config({"load_in_8bit": True}).load_in_8bit


def test_fingerprint_is_content_not_location(tiny_model_dir, tmp_path):
    fp = modeling.model_fingerprint(tiny_model_dir)
    assert fp.startswith("sha256:") and str(tiny_model_dir) not in fp
    assert modeling.model_fingerprint(str(tiny_model_dir)) == fp

    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(tiny_model_dir, moved)
    assert modeling.model_fingerprint(moved) == fp

    config = json.loads((moved / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (moved / "config.json").write_text(json.dumps(config))
    assert modeling.model_fingerprint(moved) != fp

    (moved / "config.json").unlink()
    shutil.copy(tiny_model_dir / "config.json", moved / "config.json")
    assert modeling.model_fingerprint(moved) == fp

    (moved / "extra.bin").write_bytes(b"x")
    assert modeling.model_fingerprint(moved) != fp


def test_fingerprint_of_hub_ids_names_the_revision(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local dir of that name
    assert modeling.model_fingerprint("Qwen/Qwen2.5-0.5B", "abc123") == "hub:Qwen/Qwen2.5-0.5B@abc123"
    assert modeling.model_fingerprint("Qwen/Qwen2.5-0.5B") == "hub:Qwen/Qwen2.5-0.5B@main"
    local = tmp_path / "Qwen" / "Qwen2.5-0.5B"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    assert modeling.model_fingerprint("Qwen/Qwen2.5-0.5B").startswith("sha256:")  # a local dir wins
