"""Experiment tracking of a real sft stage (per-task LoRA on the tiny Llama), read back through
each backend's own reader: TensorBoard's event reader and `mlflow.search_runs`. The curves must
equal the stage's recorded loss history, a cached rerun must add no runs, and tracking must not
change the artifact's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.sft import SFTConfig
from tunepipe.schemas.tracking import TrackingConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.stage import run_stage
from tunepipe.tasks.core.tracking import TrackingSession, finish_pipeline_run, read_record
from tunepipe.tasks.sft.stage import SFTStage
from tests.helpers.training import build_tiny_model, cpu_profile, write_data_artifact

torch.set_num_threads(1)
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    return {"model": build_tiny_model(root / "llama"), "data": write_data_artifact(root / "data")}


def sft_config(assets) -> SFTConfig:
    return SFTConfig.model_validate(
        {"model": str(assets["model"]), "method": {"name": "lora", "r": 4}, "adapters": "per_task", "max_length": 96,
         "training": {"max_steps": STEPS, "warmup_ratio": 0.0, "logging_steps": 1}}
    )


def run_sft(assets, workdir: Path, tracking: dict, run_id: str):
    session = TrackingSession(TrackingConfig.model_validate(tracking), "pipe", str(workdir), run_id)
    ref = run_stage(SFTStage(), sft_config(assets), {"data": assets["data"]}, ArtifactStore(workdir / "artifacts"), cpu_profile(),
                    tracking=session)
    finish_pipeline_run(session)
    return ref


def recorded_losses(ref) -> dict[str, list[tuple[int, float]]]:
    history = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]["loss_history"]
    return {task: [(p["step"], p["loss"]) for p in points] for task, points in history.items()}


def artifact_bytes(path: str) -> dict[str, bytes]:
    """The adapters (weights, configs, tokenizer, card) and the handoff; the metrics files carry timings."""
    root = Path(path)
    files = [p for p in sorted((root / "adapters").rglob("*")) if p.is_file()] + [root / "outputs.json"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_tensorboard_curves_equal_the_recorded_losses_and_a_cached_rerun_adds_nothing(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref = run_sft(assets, tmp_path, {"backend": "tensorboard"}, "run-1")
    losses = recorded_losses(ref)
    assert set(losses) == {"count", "sentiment"} and all(len(v) == STEPS for v in losses.values())
    stage_dir = tmp_path / "tracking" / "tensorboard" / "pipe" / "sft" / ref.key[:12]
    for task, expected in losses.items():
        events = EventAccumulator(str(stage_dir / task))
        events.Reload()
        curve = [(e.step, e.value) for e in events.Scalars("train/loss")]
        assert [s for s, _ in curve] == [s for s, _ in expected]
        assert [v for _, v in curve] == pytest.approx([v for _, v in expected], abs=1e-5)
    # The stage-level run: headline metrics and the loss plot.
    stage = EventAccumulator(str(stage_dir), size_guidance={"images": 0})
    stage.Reload()
    assert stage.Scalars("stage/train_loss/count")[0].value == pytest.approx(
        json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]["train_loss"]["count"], abs=1e-5)
    assert "plots/loss_curve" in stage.Tags()["images"]
    record = read_record(tmp_path, "sft", ref.key)
    assert record["backend"] == "tensorboard" and set(record["runs"]) == {"stage", "count", "sentiment"}

    files = sorted(p for p in (tmp_path / "tracking").rglob("*") if p.is_file())
    again = run_sft(assets, tmp_path, {"backend": "tensorboard"}, "run-2")
    assert again.cached and again.key == ref.key
    assert sorted(p for p in (tmp_path / "tracking").rglob("*") if p.is_file()) == files
    # The later run's summary links the cached stage to the tracked runs that made it.
    from tunepipe.tasks.ops.run_summary import run_summary

    linked = run_summary("run-2", str(tmp_path), {"sft": again})["stages"]["sft"]["tracking"]
    assert linked["pipeline_run"] == "run-1" and linked["runs"]["count"] == str(stage_dir / "count")

    # Tracking is not part of the artifact: untracked, the same key and the same bytes.
    plain = run_sft(assets, tmp_path / "plain", {"backend": "none"}, "run-3")
    assert plain.key == ref.key and artifact_bytes(plain.path) == artifact_bytes(ref.path)
    assert not (tmp_path / "plain" / "tracking").exists()


def test_mlflow_runs_nest_and_hold_the_recorded_losses_and_a_cached_rerun_adds_none(assets, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    ref = run_sft(assets, tmp_path, {"backend": "mlflow"}, "pipeline-run-1")
    uri = f"sqlite:///{(tmp_path / 'tracking' / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["pipe"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"pipe/run-pipeline", "pipe/sft", "pipe/sft/count", "pipe/sft/sentiment"}
    parent, stage = by_name["pipe/run-pipeline"], by_name["pipe/sft"]
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert stage.data.tags["tunepipe.key"] == ref.key and stage.data.tags["tunepipe.input.data"] == assets["data"].key
    assert all(r.info.status == "FINISHED" for r in runs)
    client = MlflowClient(uri)
    for task, expected in recorded_losses(ref).items():
        run = by_name[f"pipe/sft/{task}"]
        assert run.data.tags["mlflow.parentRunId"] == stage.info.run_id and run.data.tags["tunepipe.task"] == task
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        assert [s for s, _ in history] == [s for s, _ in expected]
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], abs=1e-5)
    assert stage.data.metrics["global_step/count"] == STEPS
    assert "plots/loss_curve.png" in [a.path for a in client.list_artifacts(stage.info.run_id, "plots")]

    again = run_sft(assets, tmp_path, {"backend": "mlflow"}, "pipeline-run-2")
    assert again.cached
    assert len(mlflow.search_runs(experiment_names=["pipe"], output_format="list")) == len(runs)


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file, parsed with W&B's own protobuf classes (wandb 0.31 reads
    these files in its Go core; its Python reader is gone). The file is a LevelDB-style log: a 7-byte
    header, 32 KiB blocks of chunks (crc32c, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, records, pending = path.read_bytes()[7:], 32768, [], b""
    offset = 0
    while offset + 7 <= len(data):
        room = block - (offset + 7) % block  # chunks never straddle a block; the tail is padding
        if room < 7 and (offset + 7) % block:
            offset += room
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        if length == 0 and kind == 0:
            break
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # full or last
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(path: Path) -> tuple[str, list[dict[str, float]]]:
    """(display name, history rows) of an offline run."""
    name, history = "", []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name or name  # later run records (updates) may leave it empty
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append({k: v for k, v in row.items() if isinstance(v, (int, float))})
    return name, history


def test_wandb_offline_runs_hold_the_recorded_losses(assets, tmp_path):
    ref = run_sft(assets, tmp_path, {"backend": "wandb", "wandb": {"mode": "offline"}}, "wandb-run-1")
    runs = dict(wandb_run(p) for p in (tmp_path / "tracking" / "wandb").glob("offline-run-*/*.wandb"))
    assert set(runs) == {"pipe/sft", "pipe/sft/count", "pipe/sft/sentiment"}
    for task, expected in recorded_losses(ref).items():
        curve = [(row["train/global_step"], row["train/loss"]) for row in runs[f"pipe/sft/{task}"] if "train/loss" in row]
        assert [s for s, _ in curve] == [s for s, _ in expected]
        assert [v for _, v in curve] == pytest.approx([v for _, v in expected], abs=1e-5)
    assert runs["pipe/sft"][0]["stage/global_step/count"] == STEPS
    assert read_record(tmp_path, "sft", ref.key)["backend"] == "wandb"
    again = run_sft(assets, tmp_path, {"backend": "wandb"}, "wandb-run-2")
    assert again.key == ref.key and again.cached
    assert len(list((tmp_path / "tracking" / "wandb").glob("offline-run-*"))) == 3
