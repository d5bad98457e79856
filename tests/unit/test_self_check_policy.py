"""Self-checks on a real tokenizer, and the switch that sets any of them to warn.

SmolLM2's BOS is ChatML's `<|im_start|>`: its template renders one per turn, so a correct row holds
three (system, user, assistant). Only a BOS the template did not render is a problem. Costs ~3 s
with the converted SmolLM2 in the cache.
"""

from __future__ import annotations

import logging

import pytest

from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.checks import IGNORE, CheckPolicy, require
from tunepipe.tasks.lm.encoding import label_mask_problem
from tunepipe.tasks.lm.encoding import Encoded, encode_conversation, encode_records, resolve_chat_template

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
]


@pytest.fixture(scope="module")
def smollm2():
    from tunepipe.tasks.lm.modeling import load_tokenizer
    from tunepipe.tests.helpers.real_model import smollm2_dir

    tokenizer = load_tokenizer(smollm2_dir())
    return tokenizer, resolve_chat_template("model", tokenizer)


def test_a_template_that_renders_bos_per_turn_passes_the_label_mask_check(smollm2):
    tokenizer, template = smollm2
    (enc,) = encode_conversation(tokenizer, template, CONVERSATION, max_length=256, train_on_inputs=False)
    assert tokenizer.bos_token == "<|im_start|>" and enc.input_ids.count(tokenizer.bos_token_id) == 3
    assert label_mask_problem(tokenizer, template, enc) is None


def test_a_bos_the_tokenizer_added_is_still_caught(smollm2):
    tokenizer, template = smollm2
    (enc,) = encode_conversation(tokenizer, template, CONVERSATION, max_length=256, train_on_inputs=False)
    added = Encoded([tokenizer.bos_token_id, *enc.input_ids], [IGNORE, *enc.labels], False, enc.messages)
    problem = label_mask_problem(tokenizer, template, added)
    assert problem is not None
    assert "4 BOS tokens ('<|im_start|>') in one row where the template renders 3" in problem and "tokenizer added" in problem


def test_a_bos_carried_in_the_data_is_caught_and_blamed_on_the_data(smollm2):
    tokenizer, template = smollm2
    messages = [CONVERSATION[0], {"role": "user", "content": "Capital of France? <|im_start|>"}, CONVERSATION[2]]
    (enc,) = encode_conversation(tokenizer, template, messages, max_length=256, train_on_inputs=False)
    problem = label_mask_problem(tokenizer, template, enc)
    assert problem is not None and "the data's text holds 1" in problem


def test_a_failed_check_names_its_switch_and_warn_publishes_it(caplog):
    policy = CheckPolicy("sft", {"loss": "warn"})
    with pytest.raises(StageFailed, match=r"self-check steps failed: ran 1 of 2 \(to publish anyway, set sft.self_checks.steps: warn\)"):
        require("steps", {"passed": False}, "ran 1 of 2", policy)
    with caplog.at_level(logging.WARNING, logger="tunepipe.sft"):
        result = require("loss", {"passed": False, "first": 1.0}, "the loss is constant", policy)
    assert result == {"passed": False, "first": 1.0, "warned": "the loss is constant"}
    assert any("sft.self_checks.loss: warn" in r.getMessage() for r in caplog.records)
    assert require("loss", {"passed": True}, "unused", policy) == {"passed": True}


def test_label_mask_set_to_warn_keeps_the_rows_and_counts_them(smollm2):
    tokenizer, template = smollm2
    bad = {"id": "r1", "messages": [CONVERSATION[0], {"role": "user", "content": "Hi <|im_start|>"}, CONVERSATION[2]]}
    good = {"id": "r2", "messages": CONVERSATION}
    with pytest.raises(StageFailed, match=r"self-check label_mask failed: train record r1: .*sft.self_checks.label_mask: warn"):
        encode_records([good, bad], tokenizer, template, max_length=256, train_on_inputs=False,
                       policy=CheckPolicy("sft", SFTConfig().self_checks))
    warn = CheckPolicy("sft", SFTConfig.model_validate({"self_checks": {"label_mask": "warn"}}).self_checks)
    by_task, stats = encode_records([good, bad, bad], tokenizer, template, max_length=256, train_on_inputs=False, policy=warn)
    assert stats.kept == 3 and stats.label_mask_failed == 2
    assert stats.label_mask_problem.startswith("train record r1:")


def test_self_checks_accepts_only_the_stages_checks():
    from pydantic import ValidationError

    from tunepipe.schemas.align import AlignConfig
    from tunepipe.schemas.export import ExportConfig

    assert AlignConfig.model_validate({"self_checks": {"adapter_changed": "warn"}}).self_checks == {"adapter_changed": "warn"}
    assert ExportConfig.model_validate({"self_checks": {"merged_matches_adapter": "warn"}}).self_checks
    with pytest.raises(ValidationError, match="label_mask"):
        SFTConfig.model_validate({"self_checks": {"reward_scores": "warn"}})


def test_warned_checks_are_listed_for_the_summary():
    from tunepipe.tasks.lm.checks import warned_markdown

    results = {"steps": {"passed": False, "warned": "ran 1 of 2"}, "loss": {"passed": True}}
    assert warned_markdown(results, "capitals") == "\n- **warning** (self-check steps, capitals, configured to warn): ran 1 of 2"
    assert warned_markdown({"loss": {"passed": True}}) == ""
