"""What crosses the training launcher is a typed job: in process the entry point gets the stage's
object itself; through a launcher's job file it is validated once, against the entry point's
annotated job class, and a malformed one fails naming the field."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from tunepipe.schemas.align import AlignConfig
from tunepipe.tasks.align.train import AlignJob, align_job
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.training.launcher import _run_training
from tunepipe.tasks.training.worker import job_payload, typed_job


def _job(tmp_path) -> AlignJob:
    return AlignJob(
        config=AlignConfig.model_validate({"method": {"name": "grpo", "rewards": ["exact_match"]}}),
        env=load_environment("cpu"), run="sentiment", sft_dir=str(tmp_path / "sft"), sft_kind="adapters",
        sft_method={"name": "lora", "r": 4}, base_model=str(tmp_path / "base"),
        prompts=[{"prompt": [{"role": "user", "content": "hi"}], "reference": "hello"}],
        pairs_file=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path), save_to="adapters/sentiment",
        checkpoint_dir=str(tmp_path / "ckpt"), judge_cache=str(tmp_path / "judge"),
    )


def test_a_job_file_is_validated_as_the_entry_points_job_class(tmp_path):
    job = _job(tmp_path)
    # what a worker reads back from the job file
    payload = json.loads(json.dumps(job_payload(job)))
    typed = typed_job(align_job, payload)
    assert isinstance(typed, AlignJob) and typed == job
    assert typed.config.method.name == "grpo" and typed.config.method.rewards == ["exact_match"]
    assert typed.env.name == "cpu" and typed.prompts[0]["reference"] == "hello"
    # a malformed job fails in the worker before any training, naming the field
    with pytest.raises(ValidationError, match="sft_kind"):
        typed_job(align_job, {**payload, "sft_kind": "adapterz"})
    with pytest.raises(ValidationError, match="config.method.grpo.num_generations"):
        typed_job(align_job, {**payload, "config": {**payload["config"], "method": {"name": "grpo", "num_generations": 1}}})
    with pytest.raises(ValidationError, match="reward_dirr"):
        typed_job(align_job, {**payload, "reward_dirr": "/x"})


def test_an_entry_point_taking_a_dict_gets_the_dict():
    def echo(job: dict) -> dict:
        return job

    assert typed_job(echo, {"message": "hi"}) == {"message": "hi"}


SEEN: list = []


def record_job(job: AlignJob) -> dict:
    SEEN.append(job)
    return {"ok": True}


def test_in_process_the_entry_point_gets_the_stages_own_object(tmp_path):
    job = _job(tmp_path)
    # the launch itself, without run_training's experiment tracking around it
    result = _run_training(f"{__name__}:record_job", job, load_environment("cpu"), logging.getLogger("t"), tmp_path / "launch")
    assert result == {"ok": True} and SEEN[-1] is job
