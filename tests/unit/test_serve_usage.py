"""Token usage counted as vLLM counts it (issue 25 item 8): an answer that ends in the end-of-sequence token
has that token in `completion_tokens` (vLLM gave 10 where the embedded engine gave 9 on the same answer)."""

from __future__ import annotations

import torch

from tunepipe.tasks.serving.engine import Row, RowTracker

EOS = 2


class Letters:
    """A tokenizer stand-in: token t decodes to the letter chr(ord('a') + t); EOS decodes to nothing."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join("" if t == EOS else chr(ord("a") + t) for t in tokens)


def run(tokens: list[int], max_tokens: int, stop: list[str] | None = None) -> tuple[list, Row]:
    events: list = []
    row = Row(prompt_ids=[5], adapter=None, max_tokens=max_tokens, emit=events.append, stop=stop or [])
    tracker = RowTracker([row], Letters(), {EOS})
    ids = [5]
    for token in tokens:
        ids.append(token)
        if tracker(torch.tensor([ids]), None)[0]:
            break
    tracker.close()
    return events, row


def test_an_answer_ending_in_eos_counts_the_eos_token():
    events, row = run([3, 4, 5, EOS], max_tokens=10)
    assert events[-1] == ("done", "stop", 4)  # three answer tokens + the end-of-sequence token
    assert row.text == "def" and row.tokens == [3, 4, 5]


def test_length_and_stop_string_finishes_count_every_generated_token():
    events, _ = run([3, 4, 5, 6], max_tokens=3)
    assert events[-1] == ("done", "length", 3)
    events, row = run([3, 4, 5, 6], max_tokens=10, stop=["e"])
    assert events[-1] == ("done", "stop", 2) and row.text == "d"  # the token completing the stop string counts
