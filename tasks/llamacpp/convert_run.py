"""Runs inside llama.cpp's venv: one of llama.cpp's converter scripts, with a named BPE pre-tokenizer as the
answer when the converter does not recognise the tokenizer.

argv: SOURCE_DIR SCRIPT PRE_TOKENIZER|- ARGS... . The converter identifies a BPE pre-tokenizer by hashing the
tokens of a probe text, so a tokenizer trained for the fine-tune (or any model it has no entry for) stops the
conversion ("BPE pre-tokenizer was not recognized"). The caller names the pre-tokenizer it knows from
tokenizer.json (a plain byte-level BPE splits with GPT-2's regex: `gpt-2`); a recognised tokenizer keeps the
converter's own answer. The verification after conversion (prompt tokens equal training's) catches a wrong name.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    source, script, pre, *args = sys.argv[1:]
    sys.path[:0] = [source, f"{source}/gguf-py"]
    if pre != "-":
        import conversion.base as base

        recognise = base.TextModel.get_vocab_base_pre

        def named_when_unknown(self, tokenizer):
            try:
                return recognise(self, tokenizer)
            except NotImplementedError:
                print(f"pre-tokenizer not recognised by the converter; using {pre!r} (from tokenizer.json)", file=sys.stderr)
                return pre

        base.TextModel.get_vocab_base_pre = named_when_unknown
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
