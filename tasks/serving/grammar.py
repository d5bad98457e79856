"""Grammar-constrained decoding for `response_format` (json_object, json_schema) with xgrammar, the
library vLLM's guided decoding uses.

One `GrammarCompiler` per engine (it caches compiled grammars); each request gets its own
`GrammarMatcher`. Per decoding step the engine masks the row's next-token logits to what the grammar
allows (before temperature and top_p, as vLLM does) and feeds the chosen token back; once the grammar is
complete only the end-of-sequence token is allowed, so the answer ends there and parses.
"""

from __future__ import annotations

import json
from typing import Any


class GrammarError(ValueError):
    """A response_format that cannot be compiled (e.g. an invalid JSON schema); the message says why."""


class Grammars:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size
        self._bitmask = None

    def matcher(self, response_format: dict[str, Any]) -> Any:
        """A fresh matcher for one request's response_format (json_object or json_schema)."""
        try:
            if response_format["type"] == "json_object":
                compiled = self.compiler.compile_builtin_json_grammar()
            else:
                schema = response_format["json_schema"].get("schema") or {}
                # no free whitespace: a small model could otherwise fill max_tokens with spaces
                compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"response_format: cannot compile its JSON schema: {str(exc).splitlines()[0][:300]}") from None
        return self._xgr.GrammarMatcher(compiled)

    def mask(self, logits, matcher: Any) -> None:
        """Set the logits of tokens `matcher` does not allow next to -inf, in place (`logits`: one row)."""
        if self._bitmask is None:  # one buffer, refilled per row and step (the engine runs on one thread)
            self._bitmask = self._xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(self._bitmask)
        self._xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self._bitmask.to(logits.device))
