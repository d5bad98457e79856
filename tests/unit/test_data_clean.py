"""Cleaning: each step, its cheap paths, and the record-level filters."""

from __future__ import annotations

import pytest

from tunepipe.schemas.data import CleanConfig
from tunepipe.tasks.data.clean import Cleaner, strip_html
from tunepipe.tasks.data.formats import RecordError


def clean(text: str, **config) -> str:
    return Cleaner(CleanConfig(**config)).text(text)


def test_html_is_parsed_not_regexed():
    assert strip_html("<p>a &amp; b</p><script>evil()</script><ul><li>x</li></ul>") == "\na & b\n\n\nx\n\n"
    assert clean("<p>Hello <b>world</b></p><p>Next</p>") == "Hello world\n\nNext"
    assert clean("if a < b and c > d") == "if a < b and c > d"  # not markup: untouched
    assert clean("<b>x</b>", strip_html=False) == "<b>x</b>"


def test_nfkc_control_and_whitespace():
    assert clean("\ufb01ne \u2460") == "fine 1"
    assert clean("a\u200bb\x07c\ufeff") == "abc"
    assert clean("one   two\tthree  \r\n\r\n\r\n\r\nfour\n    indented   code") == "one two three\n\nfour\n    indented code"
    assert clean("a\u200bb", remove_control_chars=False) == "a\u200bb"


def test_pii_masking_counts():
    cleaner = Cleaner(CleanConfig(mask_pii=True))
    text = cleaner.text("Mail jane.doe@example.org or +44 20 7946 0958, or (555) 123-4567. Born 2023-01-15, order 12345.")
    assert text == "Mail <EMAIL> or <PHONE>, or <PHONE>. Born 2023-01-15, order 12345."
    assert cleaner.pii == {"email": 1, "phone": 2}
    only_email = Cleaner(CleanConfig(mask_pii=True, pii_kinds=["email"]))
    assert only_email.text("a@b.io 555-123-4567") == "<EMAIL> 555-123-4567"
    assert Cleaner(CleanConfig()).text("a@b.io") == "a@b.io"  # masking is opt-in


def record(**fields):
    return {"kind": "instruction", "task": "t", "instruction": "Q?", "input": "", "output": "A.", "system": None, **fields}


@pytest.mark.parametrize(
    ("fields", "config", "reason"),
    [
        ({"output": " <br> "}, {}, "empty_output"),
        ({"instruction": "\u200b"}, {}, "empty_prompt"),
        ({}, {"min_chars": 10}, "too_short"),
        ({"output": "x" * 50}, {"max_chars": 20}, "too_long"),
    ],
)
def test_record_filters(fields, config, reason):
    with pytest.raises(RecordError) as caught:
        Cleaner(CleanConfig(**config)).clean_record(record(**fields))
    assert caught.value.reason == reason


def test_chat_records_are_checked_after_cleaning():
    cleaner = Cleaner(CleanConfig())
    chat = {"kind": "chat", "task": "t", "messages": [{"role": "user", "content": "<i>Hi</i>"}, {"role": "assistant", "content": "Hello"}]}
    assert cleaner.clean_record(chat) == 7 and chat["messages"][0]["content"] == "Hi"
    assert cleaner.counts["html_records"] == 1
    bad = {"kind": "chat", "task": "t", "messages": [{"role": "user", "content": "<br>"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(RecordError, match="invalid_messages"):
        cleaner.clean_record(bad)  # the only user turn was markup: nothing to answer
