"""DataConfig: impossible settings fail at load time, naming the field path."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from tunepipe.schemas import data as data_schema
from tunepipe.schemas.data import DataConfig
from tunepipe.tasks.core.loading import ConfigError, validate_yaml_mapping

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"


def load(data: dict):
    return validate_yaml_mapping(DataConfig, data, text=None, source="cfg", context={"base_dir": str(FIXTURES)})


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        load(data)
    return str(caught.value)


SOURCE = {"path": "alpaca.jsonl", "task": "general"}


def test_relative_paths_resolve_against_the_yaml_dir():
    config = load({"sources": [SOURCE]})
    assert config.sources[0].path == str((FIXTURES / "alpaca.jsonl").resolve())
    assert config.split.validation == 0.05 and config.dedup.threshold == 0.8 and config.max_rejected_fraction == 0.5


@pytest.mark.parametrize(
    ("data", "where", "what"),
    [
        ({"sources": [{"path": "nope.jsonl"}]}, "sources[0].path", "no such file"),
        ({"sources": [{"path": "build_fixtures.py"}]}, "sources[0].path", "unknown file type .py"),
        ({"sources": [{**SOURCE, "format": "xml"}]}, "sources[0].format", "Input should be"),
        ({"sources": [{**SOURCE, "colour": 1}]}, "sources[0].colour", "unknown key"),
        ({"sources": []}, "sources", "at least 1"),
        ({"sources": [SOURCE], "split": {"validation": 0.5, "test": 0.5}}, "split", "must be < 1"),
        ({"sources": [SOURCE], "clean": {"min_chars": 10, "max_chars": 5}}, "clean", "min_chars (10) > max_chars (5)"),
        ({"sources": [SOURCE], "clean": {"max_tokens": 5}}, "clean", "need clean.tokenizer"),
        ({"sources": [SOURCE], "dedup": {"num_bands": 7}}, "dedup", "must divide num_perm"),
        ({"sources": [SOURCE], "dedup": {"threshold": 1.5}}, "dedup.threshold", "less than 1"),
        ({"sources": [SOURCE], "validation": {"rules": [{"column": "response", "regex": "("}]}}, "validation.rules[0].regex", "invalid regex"),
        ({"sources": [SOURCE], "validation": {"rules": [{"column": "colour", "regex": "x"}]}}, "validation.rules[0].column", "Input should be"),
        ({"sources": [SOURCE], "mix": {"ratios": {"nosuch": 1.0}}}, "(top level)", "mix.ratios names tasks no source has: ['nosuch']"),
        ({"sources": [SOURCE], "mix": {"total": 10}}, "mix", "total needs ratios"),
        ({"sources": [SOURCE], "mix": {"caps": {"general": 0}}}, "mix.caps", "caps must be >= 1"),
        ({"sources": [SOURCE], "max_rejected_fraction": 2}, "max_rejected_fraction", "less than or equal to 1"),
        ({"sources": [SOURCE], "engine": "spark"}, "engine", "Input should be 'local', 'streaming' or 'ray'"),
        ({"sources": [SOURCE], "ray": {"adress": "auto"}}, "ray.adress", "unknown key"),
    ],
)
def test_config_errors_name_the_field(data, where, what):
    message = error_of(data)
    assert f"  {where}: " in message, message
    assert what in message, message


def test_the_engine_and_its_cluster_stay_out_of_the_stage_key():
    from tunepipe.tasks.data.stage import DataStage

    local, distributed = load({"sources": [SOURCE]}), load({"sources": [SOURCE], "engine": "ray", "ray": {"address": "head:6379"}})
    assert DataStage().key_payload(distributed) == DataStage().key_payload(local)
    assert "engine" not in DataStage().key_payload(local) and "ray" not in DataStage().key_payload(local)


def test_hub_ids_and_globs():
    config = load({"sources": [{"path": "someone/some-dataset"}, {"path": "*.jsonl", "task": "many"}]})
    assert config.sources[0].path == "someone/some-dataset" and config.sources[0].is_remote
    assert not config.sources[1].is_remote
    assert len(data_schema.source_files(config.sources[1].path)) == 4


def _models(model: type[BaseModel], seen: set) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        for arg in getattr(field.annotation, "__args__", ()) + (field.annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _models(arg, seen)
            for inner in getattr(arg, "__args__", ()):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    _models(inner, seen)


def test_every_field_is_described():
    from tunepipe.schemas import records

    seen: set = set()
    for model in (DataConfig, records.InstructionRecord, records.ChatRecord, records.PreferenceRecord, records.TextRecord):
        _models(model, seen)
    assert data_schema.SourceConfig in seen and data_schema.RuleConfig in seen and records.Message in seen
    for model in seen:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
