"""A GGUF file as a base model: named like any model, keyed by its bytes, converted once into tunepipe's
cache, and its dequantisation recorded in the manifest payload and the export's model card.

The real GGUF (SmolLM2-135M-Instruct Q4_1, tests/helpers/real_model.py) is converted once per cache; a
warm cache makes these tests cost a few seconds.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.lm import modeling
from tunepipe.tasks.lm.gguf_base import PROVENANCE_FILE, gguf_file_in
from tunepipe.tests.helpers.real_model import smollm2_gguf


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    """The real GGUF, hard-linked into its own directory (so the directory form is testable)."""
    directory = tmp_path_factory.mktemp("gguf-model")
    target = directory / "model.Q4_1.gguf"
    try:
        target.hardlink_to(smollm2_gguf())
    except OSError:
        shutil.copy(smollm2_gguf(), target)
    return target


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    """The shared cache (a conversion is slow): only when unset, a fresh one."""
    import os

    if not os.environ.get("TUNEPIPE_CACHE"):
        monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path / "cache"))


def test_gguf_file_in_names_the_file_or_a_directorys_only_gguf(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").write_bytes(b"x")
    assert gguf_file_in(one / "m.gguf") == one / "m.gguf"
    assert gguf_file_in(one) == one / "m.gguf"
    (one / "n.gguf").write_bytes(b"y")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        gguf_file_in(one)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "m.gguf").write_bytes(b"x")
    assert gguf_file_in(hf) is None  # an HF model that also ships a GGUF loads as the HF model


def test_fingerprint_is_the_files_bytes_not_its_place(tmp_path):
    a = tmp_path / "a" / "m.gguf"
    a.parent.mkdir()
    a.write_bytes(b"GGUF weights v1")
    moved = tmp_path / "b" / "other-name.gguf"
    moved.parent.mkdir()
    moved.write_bytes(a.read_bytes())
    expected = "gguf:sha256:" + hashlib.sha256(b"GGUF weights v1").hexdigest()
    assert modeling.model_fingerprint(a) == expected
    assert modeling.model_fingerprint(a.parent) == expected  # the directory holding it: the same key
    assert modeling.model_fingerprint(moved) == expected
    moved.write_bytes(b"GGUF weights v2")
    assert modeling.model_fingerprint(moved) != expected


def test_a_gguf_loads_as_its_cached_conversion(gguf):
    from tunepipe.tasks.core.runtime import cache_root

    converted = modeling.model_dir(gguf)
    digest = modeling.model_fingerprint(gguf).removeprefix("gguf:sha256:")
    assert converted == str(cache_root() / "gguf" / digest[:16])
    assert modeling.model_dir(gguf.parent) == converted
    tokenizer = modeling.load_tokenizer(gguf)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    config = modeling.load_config(gguf)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert not hasattr(config, "quantization_config")
    provenance = modeling.gguf_provenance(gguf)
    assert provenance == modeling.gguf_provenance(converted)
    assert provenance["dequantised_from"] == "Q4_1" and provenance["gguf_sha256"] == digest
    assert (modeling.model_dir(converted) == converted) and modeling.gguf_provenance(converted.rsplit("/", 1)[0]) is None


def test_a_gguf_sft_model_enters_the_key_by_bytes_and_says_it_was_dequantised(gguf, tmp_path):
    from tunepipe.tasks.sft.stage import SFTStage

    config = SFTConfig.model_validate({"model": gguf.name}, context={"base_dir": str(gguf.parent)})
    assert config.model == str(gguf)
    payload = SFTStage().key_payload(config)
    assert payload["model"] == modeling.model_fingerprint(gguf)
    assert payload["model_gguf"] == {"dequantised_from": "Q4_1", "note": "weights dequantised from Q4_1"}
    hf_payload = SFTStage().key_payload(SFTConfig.model_validate({"model": modeling.model_dir(gguf)}))
    assert "model_gguf" not in hf_payload


def test_a_missing_gguf_is_a_config_error(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="no such GGUF file"):
        SFTConfig.model_validate({"model": "models/nope.gguf"}, context={"base_dir": str(tmp_path)})


def test_the_model_card_records_the_dequantisation(gguf):
    from tunepipe.tasks.export.stage import base_provenance

    converted = modeling.model_dir(gguf)
    assert (modeling.Path(converted) / PROVENANCE_FILE).is_file()
    note = base_provenance(converted)
    assert "weights dequantised from Q4_1" in note and modeling.model_fingerprint(gguf)[12:28] in note
    assert base_provenance("owner/name") == ""


def test_serving_a_gguf_serves_its_conversion(gguf):
    from tunepipe.tasks.core.environment import load_environment
    from tunepipe.schemas.serve import ServeConfig
    from tunepipe.tasks.serving.settings import resolve_serve_config

    resolved = resolve_serve_config(ServeConfig(base=str(gguf), engine="embedded"), load_environment("cpu"))
    assert resolved.base == modeling.model_dir(gguf)


def test_plan_counts_a_gguf_base_like_its_conversion(gguf):
    """`tunepipe plan` on a GGUF: the real model's 134,515,008 parameters (tied embeddings), LoRA on top."""
    from tunepipe.tasks.core.environment import load_environment
    from tunepipe.tasks.training.memory_plan import plan

    method = SFTConfig.model_validate({"method": {"name": "lora", "r": 16, "target_modules": "all-linear"}}).method
    counted = plan(str(gguf), method, load_environment("cpu"), 128)
    assert counted["total_params"] - counted["trainable_params"] == 134_515_008
    assert counted == plan(modeling.model_dir(gguf), method, load_environment("cpu"), 128)
