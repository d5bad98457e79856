"""Where a q8_0 GGUF's loss against the transformers model comes from: top-1 agreement and mean KL of the
next-token distributions over distinct contexts (tasks/llamacpp/verify.py, as the export stage measures them),
four ways, on two texts, in one run:

    llama.cpp q8_0 vs transformers fp32          what the export stage reports
    q8_0 weights in transformers fp32 vs fp32    the weight rounding alone (the GGUF dequantised by transformers)
    llama.cpp q8_0 vs q8_0 weights in fp32       llama.cpp's CPU kernels (activations rounded to 8 bits for the dot products)
    llama.cpp f16 vs transformers fp32           the converter and f16 (should be ~1.0)

Texts: the tests' synthetic validation conversations (the quickstart's data, rendered with the chat template)
and a few sentences of English prose. Also the share of flips at near-ties (transformers' own top-2 margin).

    .venv/bin/python benchmarks/gguf_q8_loss.py                # SmolLM2-135M-Instruct (tests' real model)
    .venv/bin/python benchmarks/gguf_q8_loss.py --model DIR

Needs `tunepipe llamacpp-env`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROSE = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg developed a system of movable "
    "type that made books far cheaper to produce. Within a few decades, printing shops had spread across Europe, and the "
    "number of books in circulation grew",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose and oxygen. "
    "It takes place mainly in the leaves, inside small structures called chloroplasts, which contain the green pigment chlorophyll.",
    "To make a simple tomato sauce, heat olive oil in a pan, add chopped garlic and cook it gently until it is soft. Then add "
    "the tomatoes, a pinch of salt and some fresh basil, and let the sauce simmer for about twenty minutes.",
]


def texts(tokenizer) -> dict[str, list[list[int]]]:
    from tunepipe.tasks.lm.encoding import encode_text, record_messages, render_messages

    from tests.helpers.training import records

    template = tokenizer.chat_template
    synthetic = [list(encode_text(tokenizer, render_messages(tokenizer, template, record_messages(r), False))["input_ids"])
                 for r in records("validation")]
    return {"synthetic validation conversations": synthetic, "English prose": [list(tokenizer(p)["input_ids"]) for p in PROSE]}


def near_tie_flips(reference, other, ids) -> list[float]:
    """transformers' own top-2 margin (nats) at every distinct context where the two argmaxes differ."""
    import torch
    from tunepipe.tasks.llamacpp.verify import distinct_positions

    margins = []
    for ref, got, keep in zip(reference, other, distinct_positions(ids)):
        vocab = min(ref.shape[-1], got.shape[-1])
        ref, got = ref[keep, :vocab], got[keep, :vocab]
        top2 = ref.topk(2, -1).values
        flipped = ref.argmax(-1) != got.argmax(-1)
        margins += [round(float(m), 4) for m in (top2[:, 0] - top2[:, 1])[flipped]]
    return sorted(margins)


def main() -> int:
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunepipe.tasks.llamacpp import gguf as lcpp
    from tunepipe.tasks.llamacpp.env import require_tools
    from tunepipe.tasks.llamacpp.verify import Probe, gguf_side, reference_side, top1_and_kl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="transformers model directory (default: the tests' SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model is None:
        from tests.helpers.real_model import smollm2_dir

        args.model = str(smollm2_dir())
    tools = require_tools()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    out = {"date": str(date.today()), "model": Path(args.model).name, "texts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        f16 = lcpp.convert_model(tools, Path(args.model), work / "model-f16.gguf", "f16", None)
        q8 = lcpp.quantize(tools, f16, work / "model-q8_0.gguf", "q8_0", imatrix=None, threads=1)
        dequantised = AutoModelForCausalLM.from_pretrained(work, gguf_file=q8.name, dtype=torch.float32).eval()
        for name, ids in texts(tokenizer).items():
            probe = Probe(chats=[], prompt_ids=[], text_ids=ids, stop_ids=[], max_new_tokens=1, n_ctx=512, threads=1)
            fp32 = reference_side(model, probe).logprobs
            weights_only = reference_side(dequantised, probe).logprobs
            llama_q8 = gguf_side(tools, q8, probe, work / "logits")[1]
            llama_f16 = gguf_side(tools, f16, probe, work / "logits")[1]
            row = {}
            for label, a, b in [("llama.cpp q8_0 vs fp32", fp32, llama_q8), ("q8_0 weights in fp32 vs fp32", fp32, weights_only),
                                ("llama.cpp q8_0 vs q8_0 weights in fp32", weights_only, llama_q8), ("llama.cpp f16 vs fp32", fp32, llama_f16)]:
                top1, kl, contexts = top1_and_kl(a, b, ids)
                row[label] = {"top1_agreement": round(top1, 4), "mean_kl": round(kl, 6), "distinct_contexts": contexts}
            row["llama.cpp q8_0 flips: transformers' top-2 margin, nats"] = near_tie_flips(fp32, llama_q8, ids)
            out["texts"][name] = row
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
