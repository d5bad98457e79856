"""GGUF export parts that need no llama.cpp: the tooling's missing-build message, the pre-tokenizer names read
from tokenizer.json, the Ollama TEMPLATE translation of every family's chat template, the Modelfile grammar,
limit verdicts and the `export.gguf` schema."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from pydantic import ValidationError
from tunepipe.schemas.export import ExportConfig, GGUFLimits
from tunepipe.tasks.core.stage import StageFailed

from tests.helpers.families import FAMILIES, build_tokenizer


def test_missing_tooling_is_one_message_naming_the_command(tmp_path, monkeypatch):
    from tunepipe.tasks.export.gguf import gguf_tools

    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path))
    with pytest.raises(StageFailed) as err:
        gguf_tools()
    assert "`tunepipe llamacpp-env`" in str(err.value) and str(tmp_path / "llamacpp") in str(err.value)


def test_half_built_tooling_is_not_ready(tmp_path, monkeypatch):
    """An interrupted build (everything but the marker written last) is not taken for a built one."""
    from tunepipe.tasks.llamacpp.env import MARKER, LlamaCppEnvError, LlamaCppTools, require_tools, tools_dir

    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path))
    tools = LlamaCppTools(tools_dir())
    for path in (tools.python, tools.converter, tools.lora_converter, tools.quantize, tools.imatrix):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    with pytest.raises(LlamaCppEnvError, match=re.escape(MARKER)):
        require_tools()


def test_cli_llamacpp_env_is_a_command():
    done = subprocess.run([sys.executable, "-m", "tunepipe.flows.cli.main", "llamacpp-env", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "llama-cpp-python sdist" in done.stdout


def test_pre_tokenizer_names_from_tokenizer_json(tmp_path):
    from tunepipe.tasks.llamacpp.gguf import pre_tokenizer_of

    def named(pre):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre}))
        return pre_tokenizer_of(tmp_path)

    assert named({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    qwen = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    split = lambda regex: {"type": "Sequence", "pretokenizers": [  # noqa: E731
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"}, {"type": "ByteLevel", "use_regex": False}]}
    assert named(split(qwen)) == "qwen2"
    assert named(split(qwen.replace(r"\p{N}|", r"\p{N}{1,3}|"))) == "llama-bpe"
    assert named(split(r"\s+")) is None
    assert named({"type": "Metaspace"}) is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ollama_template_replays_the_family_chat_template(family):
    from tunepipe.tasks.llamacpp.modelfile import go_template, render, template_pieces

    tokenizer = build_tokenizer(FAMILIES[family])
    jinja = lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731
    pieces = template_pieces(jinja)
    turns = [{"role": "user", "content": "Count to two."}, {"role": "assistant", "content": "one two"}, {"role": "user", "content": "And three?"}]
    for chat in (turns[:1], turns):
        assert render(pieces, None, chat) == jinja(chat)
        if pieces.head_system is not None:
            assert render(pieces, "Be brief.", chat) == jinja([{"role": "system", "content": "Be brief."}, *chat])
    # Gemma 2 refuses a system message and Mistral moves it into the last user turn: no SYSTEM branch for them.
    assert (pieces.head_system is None) == (family in ("gemma2", "mistral"))
    template = go_template(pieces)
    assert "{{-" not in template and pieces.generation in template and template.count("{{ end }}") == (3 if pieces.head_system is not None else 2)


def test_modelfile_round_trips_through_the_parser():
    from tunepipe.tasks.llamacpp.modelfile import modelfile, parse_modelfile, template_pieces

    tokenizer = build_tokenizer(FAMILIES["llama3"])
    pieces = template_pieces(lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
    text = modelfile(gguf_name="model-q4_k_m.gguf", pieces=pieces, stops=["<|eot_id|>", "<|end_of_text|>"], system_prompt="Be brief.", num_ctx=512)
    parsed = parse_modelfile(text)
    assert parsed["from"] == "./model-q4_k_m.gguf" and parsed["system"] == "Be brief."
    assert parsed["parameters"] == {"stop": ["<|eot_id|>", "<|end_of_text|>"], "num_ctx": ["512"]}
    assert parsed["template"].startswith("{{ if .System }}<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    with pytest.raises(ValueError, match="not a Modelfile instruction"):
        parse_modelfile("FROM ./x.gguf\nBOGUS 1\n")


def test_limit_verdicts():
    from tunepipe.tasks.export.gguf import limit_verdict

    numbers = {"top1_agreement": 0.93, "mean_kl": 0.02, "perplexity_ratio": 1.01}
    assert limit_verdict(numbers, None) == {"passed": True, "reasons": [], "limits": None}
    verdict = limit_verdict(numbers, GGUFLimits(min_top1_agreement=0.95, max_mean_kl=0.05, max_perplexity_ratio=1.005))
    assert not verdict["passed"] and verdict["reasons"] == ["top-1 agreement 0.9300 < 0.95", "perplexity ratio 1.0100 > 1.005"]


def test_gguf_schema():
    config = ExportConfig.model_validate({"targets": ["merged", "gguf"]})
    assert config.gguf.types == ["f16", "q8_0", "q4_k_m"] and config.gguf.limits["q8_0"].min_top1_agreement == 0.95
    with pytest.raises(ValidationError, match="more than once"):
        ExportConfig.model_validate({"gguf": {"types": ["f16", "f16"]}})
    with pytest.raises(ValidationError, match="q4_k_x"):
        ExportConfig.model_validate({"gguf": {"types": ["q4_k_x"]}})


def test_f16_check_fails_on_a_real_divergence_or_a_template_mismatch():
    from tunepipe.tasks.export.gguf import f16_check

    numbers = {"template_tokens_equal": 1.0, "greedy_agreement": 0.5, "greedy_first_divergence": [None, 3], "template_first_mismatch": None}
    assert f16_check(numbers, [None, 0.01], tie=0.05)["passed"]  # a near-tie flipped by rounding
    assert not f16_check(numbers, [None, 2.0], tie=0.05)["passed"]  # transformers was sure: a real difference
    assert not f16_check(numbers, [None, float("inf")], tie=0.05)["passed"]  # one side stopped early
    assert not f16_check({**numbers, "template_tokens_equal": 0.5}, [None, None], tie=0.05)["passed"]


def test_first_divergence():
    from tunepipe.tasks.llamacpp.verify import first_divergence

    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_top1_and_kl_count_a_shared_prefix_once():
    """Every validation conversation opens with the same template header: a flip there is one flipped context,
    not one per conversation (SmolLM2's q8_0 had one near-tie in its default system prompt counted 5 times)."""
    import torch
    from tunepipe.tasks.llamacpp.verify import distinct_positions, top1_and_kl

    texts = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [7, 2]]
    assert distinct_positions(texts) == [[0, 1, 2], [3], [0]]
    vocab = 8
    reference = [torch.log_softmax(torch.eye(vocab)[torch.tensor(t[1:])] * 5, -1) for t in texts]
    other = [r.clone() for r in reference]
    flipped = torch.log_softmax(torch.eye(vocab)[0] * 5, -1)  # the shared context [1, 2] now predicts token 0
    other[0][1], other[1][1] = flipped, flipped
    top1, kl, contexts = top1_and_kl(reference, other, texts)
    assert contexts == 5 and top1 == pytest.approx(4 / 5)
    per_flip = float((reference[0][1].exp() * (reference[0][1] - flipped)).sum())
    assert kl == pytest.approx(per_flip / 5)


@pytest.mark.parametrize("architecture,tokenizer_class,refused", [
    ("Gemma2ForCausalLM", "GemmaTokenizer", True), ("Phi3ForCausalLM", "LlamaTokenizer", True),
    ("Phi3ForCausalLM", "GPT2Tokenizer", False), ("Gemma3ForCausalLM", "GemmaTokenizer", False), ("LlamaForCausalLM", "LlamaTokenizer", False),
])
def test_converter_refusal_names_the_missing_sentencepiece_model(tmp_path, architecture, tokenizer_class, refused):
    from tunepipe.tasks.export.gguf import lora_refusal
    from tunepipe.tasks.llamacpp.gguf import converter_refusal

    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
    why = converter_refusal(tmp_path)
    assert (why is not None) == refused
    if refused:
        assert "tokenizer.model" in why and str(tmp_path) in why
        assert lora_refusal({"peft_type": "LORA"}, tmp_path) == why  # the LoRA's base is converted too
        (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
        assert converter_refusal(tmp_path) is None


def test_converter_input_brings_the_base_sentencepiece_model_and_the_special_tokens(tmp_path):
    """transformers 5 saves a fine-tuned Gemma 2 tokenizer as tokenizer.json only: the converter gets the base's
    tokenizer.model (same vocabulary) and `added_tokens_decoder` typing the turn markers special; a base with
    another vocabulary lends nothing, and the refusal names what is missing."""
    import shutil

    from transformers import AutoTokenizer
    from tunepipe.tasks.export.gguf import converter_input
    from tunepipe.tasks.llamacpp.gguf import converter_refusal

    from tests.helpers.families import build_sentencepiece_tokenizer

    base = tmp_path / "base"
    build_sentencepiece_tokenizer(FAMILIES["gemma2"], base).save_pretrained(base)
    (base / "config.json").write_text(json.dumps({"architectures": ["Gemma2ForCausalLM"]}))
    merged = tmp_path / "merged"
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.save_pretrained(merged)
    shutil.copy(base / "config.json", merged / "config.json")
    (merged / "tokenizer.model").unlink(missing_ok=True)
    assert "tokenizer.model" in converter_refusal(merged)

    view = converter_input(merged, tokenizer, str(base), tmp_path / "view")
    assert view != merged and converter_refusal(view) is None
    assert (view / "tokenizer.model").resolve() == (base / "tokenizer.model").resolve()
    added = json.loads((view / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert added["4"] == {**added["4"], "content": "<start_of_turn>", "special": True} and added["5"]["content"] == "<end_of_turn>"

    other = tmp_path / "other"
    shutil.copytree(base, other)
    build_tokenizer(FAMILIES["gemma2"]).save_pretrained(other)  # a BPE vocabulary under the same names
    assert converter_input(merged, tokenizer, str(other), tmp_path / "view2") == merged
