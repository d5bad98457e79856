"""One align method, one unit: a method added in this test (SimPO through TRL's CPOTrainer) is its
own config class and unit plus one `units.py` line, and the align stage trains it like a built-in one:
the config accepts it by name, its knobs enter the key, its trainer's step metrics are recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
from pydantic import Field

from tunepipe.schemas.align import AlignConfig, AlignMethodConfig, MethodCategory, register_align_method
from tunepipe.tasks.align.methods import units as methods
from tunepipe.tasks.align.methods.base import AlignRun
from tunepipe.tasks.align.methods.pairwise import PAIRWISE_STEP_METRICS, PairwiseUnit, pair_dataset
from tunepipe.tasks.align.stage import AlignStage
from tunepipe.tasks.core.stage import identify, run_stage
from tests.helpers.alignment import build_assets, data_with_pairs, env, pairs_against_sft

torch.set_num_threads(1)


# --- the new method's own module: its config and its unit -------------------------------------
class SimPOMethod(AlignMethodConfig):
    """SimPO: length-normalised log-likelihood margin with a target margin; no reference model."""

    category: ClassVar[MethodCategory] = "pairwise"
    name: Literal["simpo"] = Field(description="Method: SimPO.")
    beta: float = Field(default=2.0, gt=0, description="Scale of the length-normalised reward.")
    gamma: float = Field(default=0.5, ge=0, description="Target reward margin.")


class SimPO(PairwiseUnit):
    config_cls = SimPOMethod

    def step_metrics(self, method: Any) -> dict[str, str]:
        return {**PAIRWISE_STEP_METRICS, "nll_loss": "nll_loss"}

    def pair_trainer(self, run: AlignRun, pairs: list[dict[str, Any]]) -> Any:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        method = run.config.method
        args = CPOConfig(
            **run.base_args, loss_type="simpo", cpo_alpha=0.0, beta=method.beta, simpo_gamma=method.gamma,
            max_length=run.config.max_length, disable_dropout=True,
        )
        return CPOTrainer(
            model=run.model, args=args, train_dataset=pair_dataset(pairs, run.tokenizer), processing_class=run.tokenizer,
            callbacks=run.callbacks,
        )
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def simpo_registered():
    """The one `units.py` line (undone afterwards, so other tests see the built-in methods only)."""
    from tunepipe.schemas import align as schema

    methods.register(SimPO())
    yield
    methods.UNITS.pop("simpo")
    schema._REGISTERED_METHODS.pop("simpo")


def test_an_unregistered_method_is_refused_by_name():
    with pytest.raises(ValueError, match="simpo"):
        AlignConfig.model_validate({"method": "simpo"})


def test_a_builtin_name_cannot_be_taken():
    class Fake(AlignMethodConfig):
        category: ClassVar[MethodCategory] = "pairwise"
        name: Literal["dpo"]

    with pytest.raises(ValueError, match="'dpo' is built in"):
        register_align_method(Fake)


def test_a_method_added_as_one_unit_trains_through_the_stage(tmp_path, simpo_registered):
    config = AlignConfig.model_validate(
        {"method": {"name": "simpo", "gamma": 0.3}, "max_length": 64, "heldout": {"max_examples_per_task": 0},
         "training": {"max_steps": 2, "learning_rate": 3e-2, "warmup_ratio": 0.0}}
    )
    assert isinstance(config.method, SimPOMethod) and config.trains_on_pairs() and not config.needs_reward_model()
    # The method's own knobs are in the config dump, hence in the key.
    assert config.model_dump(mode="json")["method"] == {"name": "simpo", "beta": 2.0, "gamma": 0.3}
    with pytest.raises(ValueError, match="gamma"):
        AlignConfig.model_validate({"method": {"name": "simpo", "gamma": -1}})

    assets = build_assets(tmp_path)
    data = data_with_pairs(assets, "data-pairs", pairs_against_sft(assets))
    inputs = {"data": data, "sft": assets["sft"]}
    other = config.model_copy(update={"method": SimPOMethod(name="simpo", gamma=0.4)})
    assert identify(AlignStage(), config, inputs, env()) != identify(AlignStage(), other, inputs, env())

    ref = run_stage(AlignStage(), config, inputs, assets["store"], env())
    root = Path(ref.path)
    manifest = json.loads((root / "manifest.json").read_text())
    run = json.loads((root / "metrics.json").read_text())["runs"]["all"]
    assert json.loads((root / "outputs.json").read_text())["method"] == "simpo"
    assert manifest["config"]["method"] == {"name": "simpo", "beta": 2.0, "gamma": 0.3}
    assert run["global_step"] == 2 and run["train_pairs"] == 20
    assert {c: run["checks"][c]["passed"] for c in ("steps", "loss", "adapter_changed")} == dict.fromkeys(
        ("steps", "loss", "adapter_changed"), True
    )
    # CPOTrainer's own step logs, under this unit's names
    assert len(run["step_metrics"]["margin"]) == 2 and len(run["step_metrics"]["nll_loss"]) == 2
    assert (root / "adapter" / "adapter_model.safetensors").is_file()
