"""Full-weight methods and LoRA variants train a few steps on CPU: trainable weights move, frozen
ones do not, and the saved result reloads with the plain library loaders with the same logits.
(QLoRA, AdaLoRA, IA3 and the virtual-token methods: test_sft_methods_peft.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.training import check_method, method_assets

torch.set_num_threads(1)
CASES = ["full", "freeze", "bitfit", "lora", "lora-rslora-dora-all-linear", "lora-pissa", "lora-olora"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return method_assets(tmp_path_factory.mktemp("sft-methods"))


@pytest.mark.parametrize("case", CASES)
def test_method_trains_and_reloads(assets, tmp_path, case):
    check_method(assets, tmp_path, case)
