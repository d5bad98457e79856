"""An upstream stage's config, read from its manifest as a typed view (schemas/handoffs.py
`KeyedConfig`, tasks/core/handoff.py `read_manifest_config`).

The manifests here hold what the real stages' `key_payload` returns, written as `run_stage` writes
them (the `Manifest` model), so a payload whose shape drifts from a view fails here. Each reader
of an upstream config (align, evaluate, export, the general-knowledge check) is driven through
its own function.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.handoffs import (
    AlignKeyedConfig,
    KeyedConfig,
    ModelOutputs,
    PretrainKeyedConfig,
    SFTKeyedConfig,
)
from tunepipe.schemas.manifest import ArtifactRef, Manifest, Timings
from tunepipe.schemas.pretrain import PretrainConfig
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.align.stage import AlignStage, asks_general_set
from tunepipe.tasks.core.handoff import read_manifest_config, write_handoff
from tunepipe.tasks.core.stage import Stage, StageFailed
from tunepipe.tasks.pretrain.stage import PretrainStage
from tunepipe.tasks.sft.stage import SFTStage

VIEWS = {SFTKeyedConfig: (SFTStage, SFTConfig), AlignKeyedConfig: (AlignStage, AlignConfig), PretrainKeyedConfig: (PretrainStage, PretrainConfig)}


def local_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def publish(root: Path, stage: Stage, config, outputs: ModelOutputs | None = None) -> ArtifactRef:
    """An artifact directory with the manifest run_stage would write for `config`."""
    root.mkdir(parents=True)
    manifest = Manifest(stage=stage.name, key="k" * 16, code_version="c", config=stage.key_payload(config),
                        timings=Timings(started_at="t0", finished_at="t1", seconds=0.0))
    (root / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    if outputs is not None:
        write_handoff(root, outputs)
        for rel in outputs.paths.values():
            (root / rel).mkdir(parents=True)
    return ArtifactRef(stage=stage.name, key=manifest.key, path=str(root))


def sft_config(model: str | None = None, **fields) -> SFTConfig:
    return SFTConfig.model_validate({
        "model": model, "method": {"name": "qlora", "r": 4, "quant_type": "nf4"}, "tasks": ["qa", "sentiment"],
        "system_prompt": "Answer briefly.", "training": {"max_steps": 3, "learning_rate": 1e-4, "seed": 7}, **fields,
    })


def adapter_outputs(base: Path, method: str = "qlora") -> ModelOutputs:
    return ModelOutputs(kind="adapter", method=method, base_model=str(base), paths={"all": "adapter"})


# --------------------------------------------------------------------------------------------
# The views against the real stages' payloads


def test_sft_view_reads_the_method_tasks_prompt_training_and_the_models_fingerprint(tmp_path):
    model = local_model(tmp_path / "model")
    config = sft_config(str(model))
    ref = publish(tmp_path / "sft", SFTStage(), config)
    view = read_manifest_config(ref, SFTKeyedConfig, reader="test")
    assert view.method == config.method and view.method.name == "qlora" and view.method.quant_type == "nf4"
    assert view.tasks == ["qa", "sentiment"] and view.system_prompt == "Answer briefly."
    assert view.training == config.training and view.training.seed == 7
    # The key replaced the path by the model's content: the view names it for what it is, and the
    # manifest holds no local path the key did not determine.
    assert view.base_model_fingerprint is not None and view.base_model_fingerprint.startswith("sha256:")
    assert str(model) not in (Path(ref.path) / "manifest.json").read_text()


def test_a_hub_model_is_its_id_at_its_revision_and_no_model_is_none(tmp_path):
    hub = publish(tmp_path / "hub", SFTStage(), sft_config("owner/tiny", revision="abc123"))
    assert read_manifest_config(hub, SFTKeyedConfig, reader="test").base_model_fingerprint == "hub:owner/tiny@abc123"
    inherited = publish(tmp_path / "inherited", SFTStage(), sft_config(None))
    assert read_manifest_config(inherited, SFTKeyedConfig, reader="test").base_model_fingerprint is None


def test_align_view_reads_tasks_tolerance_training_and_adds_no_system_prompt(tmp_path):
    config = AlignConfig.model_validate({"tasks": ["qa"], "task_tolerance": 0.125, "training": {"max_steps": 2}})
    view = read_manifest_config(publish(tmp_path / "align", AlignStage(), config), AlignKeyedConfig, reader="test")
    assert (view.tasks, view.task_tolerance, view.training.max_steps, view.system_prompt) == (["qa"], 0.125, 2, None)


def test_pretrain_view_tells_a_configured_model_from_the_input(tmp_path):
    continued = publish(tmp_path / "continued", PretrainStage(), PretrainConfig())
    assert read_manifest_config(continued, PretrainKeyedConfig, reader="test").base_model_fingerprint is None
    own = publish(tmp_path / "own", PretrainStage(), PretrainConfig(model=str(local_model(tmp_path / "m"))))
    assert read_manifest_config(own, PretrainKeyedConfig, reader="test").base_model_fingerprint.startswith("sha256:")


@pytest.mark.parametrize("view", list(VIEWS), ids=lambda v: v.__name__)
def test_every_field_of_a_view_is_its_stages_config_field_with_the_same_type(view: type[KeyedConfig]):
    """A field renamed or retyped in the stage's config must be changed in its view too; a field the
    key rewrites (an alias) must be one its stage's key_payload rewrites."""
    stage, config_model = VIEWS[view]
    assert view.STAGES == (stage.name,)
    for name, field in view.model_fields.items():
        source = field.alias or name
        assert source in config_model.model_fields, f"{view.__name__}.{name}: {config_model.__name__} has no field {source!r}"
        if field.alias is None:
            assert field.annotation == config_model.model_fields[source].annotation, f"{view.__name__}.{name} is typed unlike the config"
        else:
            assert stage.key_payload is not Stage.key_payload, f"{stage.__name__} does not rewrite {source!r}"


# --------------------------------------------------------------------------------------------
# Wrong and old manifests


def test_a_missing_manifest_another_stages_and_an_older_payload_name_the_artifact(tmp_path):
    with pytest.raises(StageFailed, match=r"align: .*bare/manifest.json is missing: .* not a published sft artifact"):
        read_manifest_config(tmp_path / "bare", SFTKeyedConfig, reader="align")
    align = publish(tmp_path / "align", AlignStage(), AlignConfig())
    with pytest.raises(StageFailed, match=r"evaluate: .*/align was made by the align stage, not by sft$"):
        read_manifest_config(align, SFTKeyedConfig, reader="evaluate")
    old = publish(tmp_path / "old", SFTStage(), sft_config())
    manifest = json.loads((Path(old.path) / "manifest.json").read_text())
    del manifest["config"]["system_prompt"]  # a payload from before the field existed
    (Path(old.path) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageFailed, match=r"export: the config in .*/old/manifest.json .* \(system_prompt: Field required\): re-run sft"):
        read_manifest_config(old, SFTKeyedConfig, reader="export")
    manifest["config"]["model"] = str(tmp_path / "a" / "path")  # a raw path where the key holds a fingerprint
    manifest["config"]["system_prompt"] = None
    (Path(old.path) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageFailed, match=r"\(model: String should match pattern"):
        read_manifest_config(old, SFTKeyedConfig, reader="export")


# --------------------------------------------------------------------------------------------
# Each reader


def test_evaluate_reads_an_sft_candidates_tasks_and_prompt_and_an_aligned_ones_tasks(tmp_path):
    from tunepipe.tasks.evaluate.sources import artifact_source

    base = local_model(tmp_path / "base")
    sft = publish(tmp_path / "sft", SFTStage(), sft_config(), adapter_outputs(base))
    source = artifact_source("sft", sft, None, None)
    assert (source.trained_tasks, source.system_prompt, source.base_model) == (["qa", "sentiment"], "Answer briefly.", str(base))
    align = publish(tmp_path / "align", AlignStage(), AlignConfig(tasks=["qa"]), adapter_outputs(base, "dpo"))
    aligned = artifact_source("align", align, None, None)
    assert (aligned.trained_tasks, aligned.system_prompt) == (["qa"], None)
    reward = publish(tmp_path / "reward", SFTStage(), sft_config(), adapter_outputs(base))
    manifest = json.loads((Path(reward.path) / "manifest.json").read_text())
    (Path(reward.path) / "manifest.json").write_text(json.dumps({**manifest, "stage": "reward"}))
    with pytest.raises(StageFailed, match="evaluate: reward: .* was made by the reward stage, not by sft or align$"):
        artifact_source("reward", reward, None, None)


def test_evaluate_holds_an_aligned_candidate_to_the_tolerance_align_was_run_with(tmp_path):
    from tunepipe.tasks.evaluate.sources import artifact_source
    from tunepipe.tasks.evaluate.stage import align_tolerance

    base = local_model(tmp_path / "base")
    align = publish(tmp_path / "align", AlignStage(), AlignConfig(task_tolerance=0.2), adapter_outputs(base, "dpo"))
    evidence = align_tolerance(artifact_source("align", align, None, None), {"align": align})
    assert evidence is not None and evidence.tolerance == 0.2


def test_export_reads_the_sources_system_prompt_and_training_settings(tmp_path):
    from tunepipe.tasks.export.stage import read_source

    base = local_model(tmp_path / "base")
    source = read_source(publish(tmp_path / "sft", SFTStage(), sft_config(), adapter_outputs(base)), {})
    assert source.system_prompt == "Answer briefly." and source.training.learning_rate == 1e-4 and source.training.max_steps == 3
    aligned = read_source(publish(tmp_path / "align", AlignStage(), AlignConfig(), adapter_outputs(base, "dpo")), {})
    assert aligned.system_prompt is None and aligned.training == AlignConfig().training


def test_the_general_set_skips_a_pretrain_that_continued_the_built_model_only(tmp_path):
    from tunepipe.tasks.lm.retention import from_scratch

    built = ArtifactRef(stage="base_model", key="b" * 16, path=str(local_model(tmp_path / "built")))
    continued = publish(tmp_path / "continued", PretrainStage(), PretrainConfig())
    assert from_scratch(continued.path, {"base_model": built, "pretrain": continued}) is True
    own = publish(tmp_path / "own", PretrainStage(), PretrainConfig(model=str(local_model(tmp_path / "pretrained"))))
    assert from_scratch(own.path, {"base_model": built, "pretrain": own}) is False


def test_align_asks_the_general_set_of_a_full_fine_tune_of_a_configured_model(tmp_path):
    built = ArtifactRef(stage="base_model", key="b" * 16, path=str(local_model(tmp_path / "built")))
    full = ModelOutputs(kind="model", method="full", base_model=None, paths={"all": "model"})
    configured = read_manifest_config(publish(tmp_path / "own", SFTStage(), sft_config("owner/tiny")), SFTKeyedConfig, reader="test")
    assert asks_general_set("auto", full, configured, {"base_model": built}) is True
    assert asks_general_set("off", full, configured, {"base_model": built}) is False
    # A full fine-tune of the built model (no sft.model): the built model knows nothing to lose.
    inherited = read_manifest_config(publish(tmp_path / "inherited", SFTStage(), sft_config(None)), SFTKeyedConfig, reader="test")
    assert asks_general_set("auto", full, inherited, {"base_model": built}) is False
    assert asks_general_set("auto", adapter_outputs(tmp_path / "built"), inherited, {"base_model": built}) is False
