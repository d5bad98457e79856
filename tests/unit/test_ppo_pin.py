"""PPO on a TRL without `trl.experimental.ppo` (every release after 1.12) stops with the fix."""

from __future__ import annotations

import sys

import pytest

from tunepipe.tasks.align.ppo import PPO_TRL, trl_ppo
from tunepipe.tasks.core.stage import StageFailed


def test_ppo_names_the_trl_pin_when_trl_has_no_ppo(monkeypatch):
    import trl.experimental

    monkeypatch.delattr(trl.experimental, "ppo", raising=False)
    monkeypatch.setitem(sys.modules, "trl.experimental.ppo", None)  # what a TRL without the module gives
    with pytest.raises(StageFailed) as failure:
        trl_ppo()
    message = str(failure.value)
    assert f"pip install 'trl=={PPO_TRL}'" in message
    assert "align.method ppo" in message


def test_ppo_module_is_found_on_the_pinned_trl():
    assert trl_ppo().PPOTrainer.__name__ == "PPOTrainer"
