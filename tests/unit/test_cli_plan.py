"""`tunepipe plan`: counts from the model config alone, equal to PEFT's own count."""

from __future__ import annotations

import json

import pytest

from tunepipe.flows.cli.main import main
from tests.helpers.training import build_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("plan") / "model")


def peft_count(model_dir, **lora) -> tuple[int, int]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(task_type="CAUSAL_LM", **lora))
    return model.get_nb_trainable_parameters()


def test_plan_json_matches_peft(tiny_model, capsys):
    assert main(["plan", "--model", str(tiny_model), "--method", "lora", "--lora-r", "8", "--target-modules", "all-linear", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trainable, total = peft_count(tiny_model, r=8, target_modules="all-linear")
    assert (result["trainable_params"], result["total_params"]) == (trainable, total)
    assert result["trainable_percent"] == pytest.approx(100 * trainable / total, abs=1e-3)
    assert result["memory"]["total_gb"] > 0 and result["memory"]["fits"] is True
    assert {row["environment"] for row in result["profiles"]} >= {"cpu", "single-gpu-24gb", "multi-gpu-deepspeed"}


def test_plan_named_modules(tiny_model, capsys):
    assert main(["plan", "--model", str(tiny_model), "--lora-r", "4", "--target-modules", "q_proj", "v_proj", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["trainable_params"] == peft_count(tiny_model, r=4, target_modules=["q_proj", "v_proj"])[0]


def test_plan_rejects_bad_method(tiny_model, capsys):
    assert main(["plan", "--model", str(tiny_model), "--method", "lorra"]) == 2
    assert "method" in capsys.readouterr().err
