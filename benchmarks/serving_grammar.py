"""Serving: what grammar-constrained decoding (`response_format`) costs the embedded engine in tokens/s.

    .venv/bin/python benchmarks/serving_grammar.py                       # tiny Llama, 3 repeats
    .venv/bin/python benchmarks/serving_grammar.py --base PATH           # a real base (e.g. SmolLM2's directory)

One in-process server (`ServerThread`), the same chat prompts, greedy, `--max-tokens` each, sent one at a time
(batch of one: the per-token cost of the grammar is not hidden by batching). Side by side, alternating which
goes first per repeat: requests with a `response_format` JSON schema of 24 fixed-choice items (long answers: the
mask is computed and applied at each step), and plain requests whose max_tokens is the constrained answer's
length for the same prompt (same prompts, same token counts). Per side completion tokens/s = completion tokens / wall of all its requests; per repeat the ratio constrained / plain;
the median ratio against the issue's bound (cost at most 20%: ratio >= 0.8). The grammar's one-off compile is
warmed up first and not measured. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import header, median, print_result, ratio, rounded  # noqa: E402

PROMPTS = ["Count to three.", "Classify the sentiment. I love the dog.", "Name a colour.", "What is the capital of france?"]
# 24 fixed-choice items: every answer is long (the mask is computed and applied at each of its steps)
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "votes", "schema": {
    "type": "object", "properties": {"votes": {"type": "array", "items": {"enum": ["yes", "no", "maybe"]},
                                               "minItems": 24, "maxItems": 24}},
    "required": ["votes"], "additionalProperties": False}}}
RATIO_BOUND = 0.8  # issue 27: grammar-constrained decoding costs at most 20% tokens/s


def run_side(client, constrained: bool, lengths: dict[str, int]) -> tuple[int, float]:
    """Each prompt once; constrained answers end where the schema ends, plain ones at the same token count."""
    extra = {"response_format": SCHEMA_FORMAT} if constrained else {}
    tokens, started = 0, time.perf_counter()
    for prompt in PROMPTS:
        reply = client.chat.completions.create(model="base", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=lengths[prompt], temperature=0, **extra)
        tokens += reply.usage.completion_tokens
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="base model directory (default: a tiny Llama built on the fly)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160, help="room for the schema's answer")
    args = parser.parse_args()

    import openai
    from tunepipe.schemas.serve import ServeConfig
    from tunepipe.tasks.serving.embedded import build_app
    from tunepipe.tasks.serving.process import ServerThread
    from tunepipe.tasks.serving.settings import resolve_serve_config
    from tests.helpers.training import build_tiny_model, cpu_profile

    with tempfile.TemporaryDirectory() as workdir:
        base = args.base or str(build_tiny_model(Path(workdir) / "base"))
        config = ServeConfig(base=base, served_model_name="base", engine="embedded", max_tokens_limit=args.max_tokens,
                             batch_window_ms=0)
        with ServerThread(build_app(resolve_serve_config(config, cpu_profile()), cpu_profile())) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
            generous = {prompt: args.max_tokens for prompt in PROMPTS}
            run_side(client, False, generous)  # warm up; the constrained side compiles its grammar here
            lengths = {}
            for prompt in PROMPTS:  # the constrained answers' lengths: the plain side generates as many tokens
                reply = client.chat.completions.create(model="base", messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=args.max_tokens, temperature=0,
                                                       response_format=SCHEMA_FORMAT)
                lengths[prompt] = reply.usage.completion_tokens
            runs = []
            for repeat in range(args.repeats):
                sides = {}
                for constrained in ((False, True) if repeat % 2 == 0 else (True, False)):
                    tokens, wall = run_side(client, constrained, lengths)
                    sides["constrained" if constrained else "plain"] = {"tokens": tokens, "wall_s": wall,
                                                                        "tokens_per_s": tokens / wall}
                sides["ratio"] = ratio(sides["constrained"]["tokens_per_s"], sides["plain"]["tokens_per_s"])
                runs.append(sides)
    ratios = [run["ratio"] for run in runs]
    print_result({
        **header("serving_grammar.py", sys.argv[1:]),
        "runs": [{side: ({k: rounded(v) for k, v in figures.items()} if isinstance(figures, dict) else rounded(figures))
                  for side, figures in run.items()} for run in runs],
        "plain_tokens_per_s": rounded(median([r["plain"]["tokens_per_s"] for r in runs])),
        "constrained_tokens_per_s": rounded(median([r["constrained"]["tokens_per_s"] for r in runs])),
        "ratio_median": rounded(median(ratios)),
        "bound": RATIO_BOUND,
        "bound_met": median(ratios) >= RATIO_BOUND,
    })


if __name__ == "__main__":
    main()
