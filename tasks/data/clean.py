"""Text normalisation and per-record filters.

Order per text field: HTML → NFKC → control characters → whitespace → PII. HTML goes first so
decoded entities (`&nbsp;`, `&#8203;`) are normalised like any other character, and PII last so
an address split by a tag is still found. Each step has a cheap test before the costly one
(most fields are plain ASCII without markup), which is what keeps 1M records in budget.
"""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable

from tunepipe.schemas.data import CleanConfig
from tunepipe.tasks.lm.gguf_base import model_dir
from tunepipe.tasks.data.formats import (
    TEXT_FIELDS,
    RecordError,
    response_text,
    validate_chat,
)

# A tag, comment or entity: only then is the (slow) HTML parser run on a field.
_HTML_HINT = re.compile(r"<(?:[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?|/[A-Za-z][A-Za-z0-9:-]*\s*|!--)>|<!--|&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")
# C0/C1 controls except \t \n, plus zero-width and BOM characters (invisible, break tokenisation).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# Leading indentation is kept (code). A lookbehind, not a captured group: the replacement is then
# a plain string, not a template expanded in Python per match (~3% of the local engine's time).
_INNER_SPACES = re.compile(r"(?<=\S)(?:[ \t\u00a0]{2,}|[\t\u00a0])")
_TRAILING_SPACES = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# Phone candidates; `_mask_phone` keeps only 9-15 digit matches that are not ISO dates.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])|(?<![\w+])\+?\d{10,15}(?!\w)")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
_BLOCK_TAGS = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "section", "article", "hr"})
_SKIP_TAGS = frozenset({"script", "style", "head", "title"})


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML fragment; block tags become line breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def strip_html(text: str) -> str:
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


class Cleaner:
    """Cleans records in place and counts what it changed (for the report)."""

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self.mask_email = config.mask_pii and "email" in config.pii_kinds
        self.mask_phone = config.mask_pii and "phone" in config.pii_kinds
        self.counts = {"html_records": 0, "control_char_records": 0, "nfkc_changed_records": 0}
        self.pii = {"email": 0, "phone": 0}
        self._html = self._control = self._nfkc = False

    def _mask_phone(self, match: re.Match) -> str:
        text = match.group(0)
        digits = sum(ch.isdigit() for ch in text)
        if not 9 <= digits <= 15 or _ISO_DATE.match(text):
            return text
        self.pii["phone"] += 1
        return self.config.phone_placeholder

    def _mask_email(self, match: re.Match) -> str:
        self.pii["email"] += 1
        return self.config.email_placeholder

    def text(self, value: str) -> str:
        """One field through every enabled step."""
        config = self.config
        if config.strip_html and ("<" in value or "&" in value) and _HTML_HINT.search(value):
            value = strip_html(value)
            self._html = True
        if config.unicode_nfkc and not value.isascii():
            normalised = unicodedata.normalize("NFKC", value)
            if normalised != value:
                self._nfkc = True
                value = normalised
        if "\r" in value:
            value = value.replace("\r\n", "\n").replace("\r", "\n")
        if config.remove_control_chars:
            value, removed = _CONTROL.subn("", value)
            if removed:
                self._control = True
        if config.collapse_whitespace:
            if "  " in value or "\t" in value or "\xa0" in value:  # cheap test first: most fields have none
                value = _INNER_SPACES.sub(" ", value)
            if "\n" in value:
                value = _BLANK_LINES.sub("\n\n", _TRAILING_SPACES.sub("\n", value))
            value = value.strip()
        if self.mask_email and "@" in value:
            value = _EMAIL.sub(self._mask_email, value)
        if self.mask_phone:
            value = _PHONE.sub(self._mask_phone, value)
        return value

    def clean_record(self, record: dict) -> int:
        """Clean every text field of `record` in place; return its total length in characters.

        Raises RecordError for records that are unusable after cleaning (empty prompt/output,
        malformed conversation, outside the character bounds).
        """
        self._html = self._control = self._nfkc = False
        text = self.text
        kind = record["kind"]
        if kind == "chat":
            for message in record["messages"]:
                message["content"] = text(message["content"])
            # Turns that became empty (e.g. only markup) carry nothing: drop them, then re-check.
            record["messages"] = [m for m in record["messages"] if m["content"] or m["role"] == "assistant"]
            validate_chat(record["messages"])
            chars = sum(len(m["content"]) for m in record["messages"])
            prompt_empty = not any(m["content"] for m in record["messages"] if m["role"] == "user")
        else:
            chars = 0
            for name in TEXT_FIELDS[kind]:
                value = record[name]
                if value:
                    record[name] = value = text(value)
                    chars += len(value)
            prompt_empty = (kind == "instruction" and not record["instruction"]) or (kind == "preference" and not record["prompt"])
        self.counts["html_records"] += self._html
        self.counts["control_char_records"] += self._control
        self.counts["nfkc_changed_records"] += self._nfkc
        if kind == "preference":
            degenerate_pair(record["chosen"], record["rejected"])
        if not response_text(record):
            raise RecordError("empty_output", "the target text is empty after cleaning")
        if prompt_empty:
            raise RecordError("empty_prompt", "the prompt is empty after cleaning")
        if chars < self.config.min_chars:
            raise RecordError("too_short", f"{chars} characters < min_chars {self.config.min_chars}")
        if chars > self.config.max_chars:
            raise RecordError("too_long", f"{chars} characters > max_chars {self.config.max_chars}")
        return chars


def load_token_counter(path: str):
    """A function `list[str] -> list[int]` counting tokens with the given tokenizer."""
    candidate = Path(path)
    file = candidate / "tokenizer.json" if candidate.is_dir() else candidate
    if file.is_file() and file.suffix == ".json":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(file))

        def count(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

        return count
    from transformers import (
        AutoTokenizer,  # hub ids and slow tokenizers: the general path
    )

    auto = AutoTokenizer.from_pretrained(model_dir(path))

    def count_auto(texts: list[str]) -> list[int]:
        return [len(ids) for ids in auto(texts, add_special_tokens=False)["input_ids"]]

    return count_auto


def degenerate_pair(chosen: str, rejected: str) -> None:
    """A preference pair that teaches nothing: a side empty, or both sides the same text once
    case and whitespace are set aside (reward modeling and DPO would learn noise from it)."""
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        if not (value or "").strip():
            raise RecordError("empty_output", f"the {side} response is empty after cleaning")
    if " ".join(chosen.split()).casefold() == " ".join(rejected.split()).casefold():
        raise RecordError("identical_pair", "chosen and rejected are the same text after normalisation (case, whitespace)")


def token_bound_reason(count: int, config: CleanConfig) -> tuple[str, str] | None:
    if config.min_tokens is not None and count < config.min_tokens:
        return "too_few_tokens", f"{count} tokens < min_tokens {config.min_tokens}"
    if config.max_tokens is not None and count > config.max_tokens:
        return "too_many_tokens", f"{count} tokens > max_tokens {config.max_tokens}"
    return None


def batched(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
