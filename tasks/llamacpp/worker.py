"""Runs inside llama.cpp's own venv (`tunepipe llamacpp-env`), never in tunepipe's process: it imports only
the binding and numpy. One JSON request in (argv[1]), one JSON answer out (argv[2]):

    model, lora (optional), n_ctx, threads       which GGUF, with which adapter applied
    chats: [[{role, content}, ...], ...]         → chat_ids: each conversation rendered with the GGUF's embedded
                                                   chat template, as llama-cpp-python's chat endpoint renders and
                                                   tokenizes it (Jinja2ChatFormatter; added_special → no extra BOS)
    generate: {prompts: [[ids]], max_new_tokens, stop_ids}
                                                 → generated: greedy continuations (argmax of llama.cpp's logits),
                                                   texts (llama.cpp's detokenization), seconds, tokens
    score: [[ids]], logits_file                  → every position's logits of each text, in an .npz (t0, t1, ...)
    metadata                                     → chat template, bos/eos ids, vocab size, context length
"""

from __future__ import annotations

import json
import sys
import time


def load(request):
    from llama_cpp import Llama

    kwargs = {"model_path": request["model"], "n_ctx": request.get("n_ctx", 2048), "n_threads": request.get("threads", 1),
              "n_threads_batch": request.get("threads", 1), "logits_all": True, "verbose": False, "seed": 0}
    if request.get("lora"):
        kwargs["lora_path"] = request["lora"]
    return Llama(**kwargs)


def metadata(llm):
    meta = llm.metadata
    return {
        "chat_template": meta.get("tokenizer.chat_template"), "bos_id": llm.token_bos(), "eos_id": llm.token_eos(),
        "n_vocab": llm.n_vocab(), "n_ctx_train": llm._model.n_ctx_train(),
        "architecture": meta.get("general.architecture"), "file_type": meta.get("general.file_type"),
    }


def render_chats(llm, chats):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        raise SystemExit("the GGUF has no tokenizer.chat_template")
    token = lambda i: llm.detokenize([i], special=True).decode("utf-8", errors="replace") if i >= 0 else ""
    formatter = Jinja2ChatFormatter(template=template, eos_token=token(llm.token_eos()), bos_token=token(llm.token_bos()))
    out = []
    for messages in chats:
        rendered = formatter(messages=messages)
        out.append(llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True))
    return out


def greedy(llm, prompt, max_new_tokens, stop_ids):
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    generated = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop_ids:
            break
        generated.append(token)
        llm.eval([token])
    return generated


def main(request_path, answer_path):
    import numpy as np

    request = json.loads(open(request_path).read())
    llm = load(request)
    answer = {"metadata": metadata(llm)}
    if request.get("chats"):
        answer["chat_ids"] = render_chats(llm, request["chats"])
    if request.get("generate"):
        spec = request["generate"]
        stops = set(spec.get("stop_ids") or [])
        started = time.perf_counter()
        ids = [greedy(llm, p, spec["max_new_tokens"], stops) for p in spec["prompts"]]
        seconds = time.perf_counter() - started
        answer["generated"] = {"ids": ids, "texts": [llm.detokenize(g).decode("utf-8", errors="replace") for g in ids],
                               "seconds": seconds, "tokens": sum(len(g) for g in ids)}
    if request.get("score"):
        arrays = {}
        for i, ids in enumerate(request["score"]):
            llm.reset()
            llm.eval(ids)
            arrays[f"t{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        np.savez(request["logits_file"], **arrays)
    with open(answer_path, "w") as out:
        json.dump(answer, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
