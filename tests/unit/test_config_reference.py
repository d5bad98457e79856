"""schemas/REFERENCE.md is generated from the schemas and must not drift from them."""

from __future__ import annotations

from tunepipe.tasks.core.config_reference import config_reference
from tests.conftest import REPO


def test_reference_is_up_to_date():
    committed = (REPO / "schemas" / "REFERENCE.md").read_text()
    assert committed == config_reference(), "run: tunepipe config-reference -o schemas/REFERENCE.md"


def test_reference_lists_nested_sections_with_descriptions():
    text = config_reference()
    for section in ("### `(top level)`", "### `(top level).data`", "### `(top level).data.sources`", "### `(profile)`"):
        assert section in text
    assert "| `max_rejected_fraction` |" in text
    assert "| `workdir` | `str` | required |" in text
