"""The training progress callback throttles its Prefect API calls (each one blocks a step)."""

from __future__ import annotations

from types import SimpleNamespace

import prefect.artifacts

from tunepipe.tasks.training.progress import PrefectProgress


def test_progress_updates_at_most_once_per_interval_and_always_at_the_end(monkeypatch):
    sent: list[float] = []
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda artifact_id, progress: sent.append(progress))
    now = [0.0]
    callback = PrefectProgress("sft", min_interval_s=5.0, clock=lambda: now[0])
    callback.artifact_id, callback.reported, callback.reported_at = "id", 0, 0.0  # as on_train_begin leaves it
    state = SimpleNamespace(max_steps=100, global_step=0)
    for step in range(1, 100):  # one step per second
        now[0], state.global_step = float(step), step
        callback.on_step_end(None, state, None)
    assert sent == [5.0 * k for k in range(1, 20)]  # every 5 s, not every percent (100 calls)
    callback.on_train_end(None, state, None)
    assert sent[-1] == 100.0 and len(sent) == 20


def test_no_calls_outside_a_prefect_task(monkeypatch):
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    callback = PrefectProgress("sft", clock=lambda: 1e9)
    state = SimpleNamespace(max_steps=10, global_step=5, is_world_process_zero=True)
    callback.on_train_begin(None, state, None)  # not in a task run: no artifact
    callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    assert callback.artifact_id is None


def test_watched_step_metrics_ride_along_in_the_description(monkeypatch):
    sent: list[tuple] = []
    monkeypatch.setattr(
        prefect.artifacts, "update_progress_artifact", lambda artifact_id, progress, **kw: sent.append((progress, kw.get("description")))
    )
    callback = PrefectProgress("align (all, grpo)", min_interval_s=0.0, clock=lambda: 1.0,
                               watch={"reward": "reward_mean", "frac_reward_zero_std": "frac_reward_zero_std"})
    callback.artifact_id, callback.reported, callback.reported_at = "id", 0, 0.0
    state = SimpleNamespace(max_steps=4, global_step=1)
    callback.on_step_end(None, state, None)
    assert sent == [(25.0, None)]  # nothing logged yet: the plain progress
    callback.on_log(None, state, None, logs={"reward": 0.0, "frac_reward_zero_std": 1.0, "loss": 0.0, "note": "x"})
    state.global_step = 2
    callback.on_step_end(None, state, None)
    assert sent[-1] == (50.0, "align (all, grpo): training progress (%); step 1: reward_mean 0, frac_reward_zero_std 1")
