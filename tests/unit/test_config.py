"""Config validation: errors name the field path and line, before any work."""

from __future__ import annotations

import inspect
import textwrap

import pytest

from tunepipe.tasks.core.config import load_pipeline_config
from tunepipe.tasks.core.loading import ConfigError
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.selection import StageSelection


def write(tmp_path, text: str):
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    return path


MINIMAL = """\
name: t
workdir: work
data:
  sources:
    - {path: data.jsonl, format: alpaca, task: demo}
"""


def test_minimal_config_resolves_paths_against_the_yaml(tmp_path):
    config = load_pipeline_config(write(tmp_path, MINIMAL))
    assert config.workdir == str(tmp_path / "work")
    assert config.data.sources[0].path == str(tmp_path / "data.jsonl")
    assert config.environment == "cpu" and config.stages() == ["data"]


def test_unknown_key_names_path_and_line(tmp_path):
    path = write(tmp_path, MINIMAL + "  dedupe_everything: true\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(path)
    assert "data.dedupe_everything (line 6): unknown key" in str(err.value)


def test_wrong_type_in_list_item_names_index(tmp_path):
    path = write(tmp_path, MINIMAL.replace("format: alpaca", "format: 12"))
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(path)
    assert "data.sources[0].format (line 5)" in str(err.value)


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"sftt \(line 6\): unknown key"):
        load_pipeline_config(write(tmp_path, MINIMAL + "sftt: {}\n"))


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"name: Field required"):
        load_pipeline_config(write(tmp_path, MINIMAL.replace("name: t\n", "")))


def test_unknown_environment_fails_before_work(tmp_path):
    with pytest.raises(ConfigError, match="environment 'gpu-9000'.*bundled profile"):
        load_pipeline_config(write(tmp_path, MINIMAL + "environment: gpu-9000\n"))


def test_environment_override_and_profile_file(tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text("name: mine\ndevice: cpu\ndevice_memory_gb: 4\nper_device_batch_size: 2\n")
    config = load_pipeline_config(write(tmp_path, MINIMAL), environment=str(profile))
    assert load_environment(config.environment).per_device_batch_size == 2


def test_impossible_profile_combination(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("name: bad\ndevice: cpu\ndevice_memory_gb: 4\nattn_implementation: flash_attention_2\n")
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA device"):
        load_environment(str(profile))
    profile.write_text("name: bad\ndevice: cpu\ndevice_memory_gb: 4\nliger_kernel: true\n")
    with pytest.raises(ConfigError, match="liger_kernel needs a CUDA device"):
        load_environment(str(profile))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_pipeline_config(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline_config(path)


def test_stage_selection_rejects_unknown_and_inverted_stages():
    with pytest.raises(ValueError, match="--until sft: not a configured stage"):
        StageSelection(stages=["data", "base_model"], until="sft")
    with pytest.raises(ValueError, match="comes after"):
        StageSelection(stages=["data", "base_model"], until="data", from_stage="base_model")
    selection = StageSelection(stages=["data", "base_model"], from_stage="base_model")
    assert (selection.includes("data"), selection.refresh("data"), selection.refresh("base_model")) == (True, False, True)
    assert StageSelection(stages=["data", "base_model"], until="data").includes("base_model") is False


def _config_models():
    import tunepipe.schemas.base as base
    import pkgutil
    import importlib
    import tunepipe.schemas as schemas

    for info in pkgutil.iter_modules(schemas.__path__):
        module = importlib.import_module(f"schemas.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, base.StrictModel) and obj is not base.StrictModel and obj.__module__ == module.__name__:
                yield obj


def test_every_config_field_is_described():
    missing = [f"{m.__name__}.{name}" for m in _config_models() for name, f in m.model_fields.items() if not f.description]
    assert missing == []


def test_every_config_model_forbids_extra_keys():
    assert all(m.model_config.get("extra") == "forbid" for m in _config_models())


def test_all_bundled_profiles_load():
    from tunepipe.tasks.core.environment import bundled_profiles

    names = bundled_profiles()
    assert {"cpu", "single-gpu-24gb", "single-gpu-80gb", "multi-gpu-deepspeed", "serve-vllm"} <= set(names)
    for name in names:
        env = load_environment(name)
        assert env.name == name
        if env.launcher == "deepspeed":
            from tunepipe.tasks.core.environment import deepspeed_config_path

            assert deepspeed_config_path(env).is_file()


def test_stages_need_their_upstream_sections(tmp_path):
    with pytest.raises(ConfigError, match="deploy needs the export stage"):
        load_pipeline_config(write(tmp_path, MINIMAL + "base_model: {}\nsft: {}\ndeploy: {name: qs}\n"))
    with pytest.raises(ConfigError, match="align.method ppo scores with the reward model"):
        load_pipeline_config(write(tmp_path, MINIMAL + "base_model: {}\nsft: {}\nalign: {method: ppo}\n"))


def test_serving_baseline_reads_the_registry_deploy_writes(tmp_path):
    config = load_pipeline_config(
        write(tmp_path, MINIMAL + "base_model: {}\nsft: {}\nevaluate: {baseline: serving}\nexport: {}\ndeploy: {name: qs}\n"),
        workdir=str(tmp_path / "elsewhere"),
    )
    assert config.evaluate.registry == str(tmp_path / "elsewhere" / "registry")
    assert config.evaluate.registry_name == "qs"
    # Other baselines leave the fields unset: they enter the evaluate key.
    plain = load_pipeline_config(write(tmp_path, MINIMAL + "base_model: {}\nsft: {}\nevaluate: {}\n"))
    assert plain.evaluate.registry is None and plain.evaluate.registry_name is None
