"""QLoRA (bitsandbytes 4-bit on CPU), AdaLoRA, IA3 and the virtual-token methods train a few steps:
trainable weights move, frozen ones do not, and the adapter reloads with `PeftModel.from_pretrained`
with the same logits."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.training import check_method, method_assets

torch.set_num_threads(1)
CASES = ["qlora-nf4", "qlora-fp4", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return method_assets(tmp_path_factory.mktemp("sft-peft-methods"))


@pytest.mark.parametrize("case", CASES)
def test_method_trains_and_reloads(assets, tmp_path, case):
    pytest.importorskip("bitsandbytes") if case.startswith("qlora") else None
    check_method(assets, tmp_path, case)
