"""The embedded multi-LoRA server, driven by the official `openai` client over a real socket.

One tiny base model, LoRA adapters initialised with different random weights (so their greedy
answers differ: enough for a serving test, no training needed), one real uvicorn server for the
module. Every generated answer is compared with the same model's offline greedy `generate`.
"""

from __future__ import annotations

import os
import threading

import httpx
import openai
import pytest
import torch

torch.set_num_threads(1)

from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.embedded import build_app
from tunepipe.tasks.serving.process import ServerThread
from tunepipe.tasks.serving.router import read_log
from tunepipe.tasks.serving.settings import resolve_serve_config

from tests.helpers.training import build_tiny_model, cpu_profile  # noqa: E402

KEY = "test-key"
PROMPTS = ["the cat sat on", "Classify the sentiment. I love the dog."]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]
MAX_TOKENS = 10


def make_adapter(base, path, seed: int, r: int = 4, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False, **lora)
    get_peft_model(model, config).save_pretrained(path)
    return str(path)


def offline_model(base, adapter):
    """What a user gets running the model directly (no server)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return (PeftModel.from_pretrained(model, adapter) if adapter is not None else model).eval()


def offline_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = MAX_TOKENS) -> str:
    """One sequence, greedy."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    # a character the last tokens left incomplete is not answered (as vLLM does not): see engine._finished_text
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True).rstrip("\ufffd")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve")
    base = str(build_tiny_model(root / "base"))
    allowed = root / "adapters"
    adapters = {name: make_adapter(base, allowed / name, seed) for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3))}
    outside = make_adapter(base, root / "elsewhere" / "delta", 4)
    (allowed / "sneaky").symlink_to(root / "elsewhere" / "delta")  # inside by name, outside by target
    big = make_adapter(base, allowed / "big", 5, r=16)
    rank2 = make_adapter(base, allowed / "rank2", 7, r=2)
    dora = make_adapter(base, allowed / "dora", 6, use_dora=True)

    tokenizer = AutoTokenizer.from_pretrained(base)
    completion_ids = {p: tokenizer(p)["input_ids"] for p in PROMPTS}
    chat_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    expected = {}
    for name in (None, "alpha", "beta", "gamma"):
        model = offline_model(base, adapters.get(name))
        expected[name] = {p: offline_greedy(model, tokenizer, ids) for p, ids in completion_ids.items()}
        expected[name]["chat"] = offline_greedy(model, tokenizer, chat_ids)

    os.environ["TUNEPIPE_TEST_SERVE_KEY"] = KEY  # the config refers to the key; the value never enters it
    config = ServeConfig(
        base=base, served_model_name="tiny", lora_modules={"alpha": adapters["alpha"], "beta": adapters["beta"]},
        engine="embedded", api_key="${TUNEPIPE_TEST_SERVE_KEY}", allowed_adapter_dirs=[str(allowed)], max_tokens_limit=64, max_request_bytes=4096,
        max_lora_rank=8, batch_window_ms=50, max_loras=3,
        router={"name": "bot", "versions": {"alpha": 0.5, "beta": 0.5}, "log_path": str(root / "ab.jsonl"), "seed": 0},
    )
    app = build_app(resolve_serve_config(config, cpu_profile()), cpu_profile())
    with ServerThread(app) as server:
        yield {
            "url": server.url, "app": app, "expected": expected, "adapters": adapters, "outside": outside,
            "sneaky": str(allowed / "sneaky"), "big": big, "rank2": rank2, "dora": dora, "log": root / "ab.jsonl", "base": base,
        }


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def complete(client, model, prompt, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, **kw)


def test_model_list_names_the_base_and_each_adapter_with_parent(client, served):
    cards = {m.id: m for m in client.models.list().data}
    assert {"tiny", "alpha", "beta", "bot"} <= set(cards)
    assert cards["tiny"].parent is None and cards["tiny"].root == served["base"]
    assert cards["alpha"].parent == "tiny" and cards["alpha"].root == served["adapters"]["alpha"]
    assert cards["beta"].parent == "tiny"


def test_completions_per_adapter_equal_offline_greedy_and_differ(client, served):
    expected = served["expected"]
    for prompt in PROMPTS:
        got = {name: complete(client, name, prompt) for name in ("tiny", "alpha", "beta")}
        assert got["alpha"].choices[0].text == expected["alpha"][prompt]
        assert got["beta"].choices[0].text == expected["beta"][prompt]
        assert got["tiny"].choices[0].text == expected[None][prompt]
        assert got["alpha"].choices[0].text != got["beta"].choices[0].text  # two adapters, two answers
        assert got["alpha"].model == "alpha" and got["alpha"].usage.completion_tokens == MAX_TOKENS
        assert got["alpha"].choices[0].finish_reason == "length"


def test_chat_per_adapter_equals_offline_greedy_through_the_chat_template(client, served):
    answers = {}
    for name in ("alpha", "beta"):
        reply = client.chat.completions.create(model=name, messages=CHAT, max_tokens=MAX_TOKENS)
        answers[name] = reply.choices[0].message.content
        assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
        assert answers[name] == served["expected"][name]["chat"]
    assert answers["alpha"] != answers["beta"]


def test_streaming_chat_and_completion_concatenate_to_the_same_answer(client, served):
    chunks = list(client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=MAX_TOKENS, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices[0].delta.content) >= 2  # it streamed, not one lump
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == served["expected"]["alpha"]["chat"]
    assert chunks[-1].choices[0].finish_reason == "length"

    pieces = list(complete(client, "beta", PROMPTS[0], stream=True))
    assert "".join(p.choices[0].text for p in pieces) == served["expected"]["beta"][PROMPTS[0]]

    raw = httpx.post(served["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 3, "stream": True}, timeout=60)
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert raw.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"


def test_concurrent_requests_for_different_adapters_share_one_batch(client, served):
    results: dict[tuple, str] = {}

    def ask(name, prompt):
        results[(name, prompt)] = complete(client, name, prompt).choices[0].text

    jobs = [threading.Thread(target=ask, args=(name, prompt)) for name in ("alpha", "beta", "tiny") for prompt in PROMPTS]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    for (name, prompt), text in results.items():
        assert text == served["expected"][None if name == "tiny" else name][prompt], (name, prompt)
    batches = served["app"].state.serve.batcher.batches
    assert any(len(set(batch)) >= 2 for batch in batches[-6:]), batches[-6:]  # adapters mixed in one generate call


def test_stop_strings_and_max_tokens(client, served):
    full = served["expected"]["alpha"][PROMPTS[1]]
    stop = full[4:6]
    cut = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    short = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert full.startswith(short.choices[0].text)


def test_hot_load_answers_like_offline_and_unload_removes_it(client, served):
    done = client.post("/load_lora_adapter", body={"lora_name": "gamma", "lora_path": served["adapters"]["gamma"]}, cast_to=str)
    assert "gamma" in done
    assert "gamma" in {m.id for m in client.models.list().data}
    assert complete(client, "gamma", PROMPTS[0]).choices[0].text == served["expected"]["gamma"][PROMPTS[0]]
    with pytest.raises(openai.BadRequestError, match="already been loaded"):
        client.post("/load_lora_adapter", body={"lora_name": "gamma", "lora_path": served["adapters"]["gamma"]}, cast_to=str)
    client.post("/unload_lora_adapter", body={"lora_name": "gamma"}, cast_to=str)
    assert "gamma" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        complete(client, "gamma", PROMPTS[0])
    with pytest.raises(openai.NotFoundError):
        client.post("/unload_lora_adapter", body={"lora_name": "gamma"}, cast_to=str)


def test_an_unloaded_slot_is_refilled_by_the_next_adapter_of_its_shape(client, served):
    engine = served["app"].state.serve.engine
    client.post("/load_lora_adapter", body={"lora_name": "gamma", "lora_path": served["adapters"]["gamma"]}, cast_to=str)
    slot = engine.slots["gamma"]
    client.post("/unload_lora_adapter", body={"lora_name": "gamma"}, cast_to=str)
    assert slot in engine.free_slots
    # beta's weights into gamma's old slot: every tensor is overwritten, so it answers as beta does.
    client.post("/load_lora_adapter", body={"lora_name": "beta-copy", "lora_path": served["adapters"]["beta"]}, cast_to=str)
    assert engine.slots["beta-copy"] == slot and slot not in engine.free_slots
    for prompt in PROMPTS:
        assert complete(client, "beta-copy", prompt).choices[0].text == served["expected"]["beta"][prompt]
    assert complete(client, "alpha", PROMPTS[0]).choices[0].text == served["expected"]["alpha"][PROMPTS[0]]
    client.post("/unload_lora_adapter", body={"lora_name": "beta-copy"}, cast_to=str)
    # Another shape (rank 2) cannot take that slot: it gets a new one.
    client.post("/load_lora_adapter", body={"lora_name": "rank2", "lora_path": served["rank2"]}, cast_to=str)
    assert engine.slots["rank2"] != slot and slot in engine.free_slots
    client.post("/unload_lora_adapter", body={"lora_name": "rank2"}, cast_to=str)


def test_loads_from_outside_the_allowed_directories_are_refused(client, served):
    for path in (served["outside"], served["sneaky"], "/etc"):
        with pytest.raises(openai.PermissionDeniedError, match="allowed directories") as info:
            client.post("/load_lora_adapter", body={"lora_name": "delta", "lora_path": path}, cast_to=str)
        assert info.value.body["type"] == "permission_error"
    assert "delta" not in {m.id for m in client.models.list().data}


def test_adapters_vllm_would_refuse_are_refused(client, served):
    with pytest.raises(openai.BadRequestError, match="max_lora_rank 8"):
        client.post("/load_lora_adapter", body={"lora_name": "big", "lora_path": served["big"]}, cast_to=str)
    with pytest.raises(openai.BadRequestError, match="DoRA"):
        client.post("/load_lora_adapter", body={"lora_name": "dora", "lora_path": served["dora"]}, cast_to=str)


def test_errors_are_openai_shaped(client, served):
    with pytest.raises(openai.NotFoundError) as info:
        complete(client, "no-such-adapter", "hi")
    assert info.value.body["code"] == "model_not_found" and "no-such-adapter" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="alpha", prompt="hi", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="alpha", messages=[])
    bad_key = openai.OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.APIStatusError) as too_big:
        complete(client, "alpha", "the cat " * 1000)
    assert too_big.value.status_code == 413
    chunked = httpx.post(served["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                         content=iter([b'{"model": "alpha", "prompt": "', b"x" * 5000, b'"}']))
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(served["url"] + "/health").status_code == 200  # no key needed for health


def test_ab_router_splits_by_weight_logs_each_request_and_sticks_to_users(client, served):
    before = len(read_log(served["log"]))
    served_by = [complete(client, "bot", PROMPTS[0], user=f"user-{i}").model for i in range(16)]
    again = [complete(client, "bot", PROMPTS[0], user=f"user-{i}").model for i in range(4)]
    assert set(served_by) == {"alpha", "beta"}  # both arms get traffic
    assert again == served_by[:4]  # a user stays on one version
    lines = read_log(served["log"])[before:]
    assert [line["version"] for line in lines] == served_by + again
    assert all(line["router"] == "bot" and line["status"] == "ok" and line["completion_tokens"] == MAX_TOKENS for line in lines)
    answer = complete(client, "bot", PROMPTS[0], user="user-0")
    assert answer.choices[0].text == served["expected"][answer.model][PROMPTS[0]]


def raw_post(served, path: str, **kw) -> httpx.Response:
    return httpx.post(served["url"] + path, headers={"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}, timeout=60, **kw)


def test_empty_and_whitespace_prompts_generate_as_openai_does(client, served):
    # OpenAI: an empty prompt generates as from the start of a new document. It answered 500 here.
    for prompt in ("", "   ", "\n"):
        answer = client.completions.create(model="alpha", prompt=prompt, max_tokens=3)
        assert answer.usage.completion_tokens <= 3 and answer.choices[0].finish_reason in ("length", "stop")
    reply = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "  "}], max_tokens=3)
    assert reply.choices[0].message.role == "assistant"


def test_malformed_bodies_name_the_problem_not_a_position(served):
    broken = raw_post(served, "/v1/completions", content=b'{"model": "alpha", "prompt": "hi", "max_tokens": }',
                      headers={"Content-Type": "application/json"})
    error = broken.json()["error"]
    assert broken.status_code == 400 and error["param"] is None and error["type"] == "invalid_request_error"
    assert error["message"] == "request body is not valid JSON at character 49: Expecting value"
    for body in (b"[1, 2]", b'"text"', b"null"):
        answer = raw_post(served, "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and "JSON object" in answer.json()["error"]["message"], body
    wrong = raw_post(served, "/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": 5}]})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "messages[0].content"


@pytest.mark.parametrize("path, extra, param, message", [
    ("/v1/completions", {"n": 2}, "n", "only n=1 is supported"),
    ("/v1/completions", {"logprobs": 1, "stream": True}, "logprobs", "without stream only"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2, "stream": True}, "logprobs", "without stream only"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ("/v1/completions", {"best_of": 3}, "best_of", "only best_of=1"),
    ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop sequences, got 5"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ("/v1/chat/completions", {"logit_bias": {"50": 2}}, "logit_bias", "not supported"),
    # fields that were silently dropped (a 200 that ignored them): honoured or refused, never ignored
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type", "Input should be"),
    # this base's template renders no tools (tool calling itself: test_serve_tools.py)
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "no tool support"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice", "no `tools` are given"),
    ("/v1/chat/completions", {"store": True}, "store", "not supported"),
    ("/v1/chat/completions", {"tempreature": 0.5}, "tempreature", "Unrecognized request argument supplied: tempreature"),
    ("/v1/completions", {"messages": []}, "messages", "Unrecognized request argument supplied: messages"),
    ("/v1/completions", {"skip_special_tokens": False}, "skip_special_tokens", "Input should be True"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "name", "message field name"),
])
def test_unsupported_fields_are_a_400_naming_them(served, path, extra, param, message):
    body = {"model": "alpha", "max_tokens": 2, **({"prompt": "hi"} if "chat" not in path else {"messages": CHAT}), **extra}
    answer = raw_post(served, path, json=body)
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == param and message in error["message"], error


def test_defaults_of_unsupported_fields_are_accepted(client, served):
    # What the official clients send by default must not be refused.
    answer = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=2, n=1, logprobs=False,
                                            presence_penalty=0, frequency_penalty=0)
    assert answer.usage.completion_tokens == 2
    assert client.chat.completions.create(model="alpha", messages=CHAT, max_completion_tokens=2).usage.completion_tokens == 2
    # vLLM's extensions the evaluate stage sends to either engine are honoured
    plain = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=2, logprobs=0, echo=True)
    bare = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=2, logprobs=0, echo=True,
                                     extra_body={"add_special_tokens": False, "skip_special_tokens": True})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served["base"])
    assert len(plain.choices[0].logprobs.tokens) - 2 == len(tokenizer(PROMPTS[0])["input_ids"])
    assert len(bare.choices[0].logprobs.tokens) - 2 == len(tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"])
    # values that ask for nothing the engine lacks are accepted
    neutral = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=2, response_format={"type": "text"},
                                             tool_choice="none", store=False, service_tier="auto", parallel_tool_calls=False)
    assert neutral.usage.completion_tokens == 2


def test_stop_lists_cut_at_the_first_stop_found(client, served):
    full = served["expected"]["alpha"][PROMPTS[1]]
    first, later = full[4:6], full[7:9]
    cut = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, stop=["never-there", later, first])
    assert cut.choices[0].text == full[: full.find(first)] and cut.choices[0].finish_reason == "stop"


def test_stream_options_include_usage_ends_with_a_usage_chunk(client, served):
    chunks = list(client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == MAX_TOKENS
    assert last.usage.total_tokens == last.usage.prompt_tokens + MAX_TOKENS and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == served["expected"]["alpha"]["chat"]
    pieces = list(complete(client, "beta", PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    assert pieces[-1].choices == [] and pieces[-1].usage.completion_tokens == MAX_TOKENS


def reference_logprobs(served, adapter: str, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Offline: the greedy continuation of `ids` and every token's log-probability given the ones before it."""
    model = offline_model(served["base"], served["adapters"][adapter])
    with torch.no_grad():
        full = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)[0].tolist()
        logprobs = model(torch.tensor([full])).logits[0].log_softmax(-1)
    return full, [logprobs[i, full[i + 1]].item() for i in range(len(full) - 1)]


def test_logprobs_and_echo_equal_the_models_own_log_softmax(client, served):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served["base"])
    ids = tokenizer(PROMPTS[1])["input_ids"]
    full, expected = reference_logprobs(served, "alpha", ids, 3)
    for prompt in (PROMPTS[1], ids):  # text, and token ids as lm-eval sends them
        answer = client.completions.create(model="alpha", prompt=prompt, max_tokens=3, logprobs=2, echo=True)
        got = answer.choices[0].logprobs
        assert answer.choices[0].text.startswith(tokenizer.decode(ids)) and len(got.tokens) == len(full)
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        assert max(abs(a - b) for a, b in zip(got.token_logprobs[1:], expected)) < 1e-4
        for position in range(len(ids), len(full)):  # greedy: the chosen token is the best alternative
            assert abs(max(got.top_logprobs[position].values()) - got.token_logprobs[position]) < 1e-6
        assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]
    plain = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=3, logprobs=0).choices[0]
    assert len(plain.logprobs.token_logprobs) == 3 and not plain.text.startswith(PROMPTS[1])

    chat_ids = tokenizer(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"]
    _, chat_expected = reference_logprobs(served, "beta", chat_ids, 3)
    reply = client.chat.completions.create(model="beta", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert [len(entry.top_logprobs) for entry in content] == [2, 2, 2]
    assert max(abs(e.logprob - x) for e, x in zip(content, chat_expected[len(chat_ids) - 1:])) < 1e-4
    assert all(abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6 for e in content)  # greedy picked the best
    assert "".join(e.token for e in content) == reply.choices[0].message.content


def test_lm_eval_multiple_choice_through_the_endpoint_equals_lm_eval_on_the_model(served, tmp_path, monkeypatch):
    from tests.helpers.lm_eval_mc import run_mc, write_mc_task

    items = [{"question": q, "choices": c, "answer": a} for q, c, a in (
        ("the cat sat on", ["the mat", "a dog", "the moon"], 0), ("I love the", ["dog", "cat sat", "sentiment"], 1),
        ("Count to", ["three", "the dog", "one two"], 0), ("Classify the", ["sentiment", "mat", "moon"], 0))]
    task = write_mc_task(tmp_path, items)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)

    endpoint = run_mc(task, "local-completions", f"base_url={served['url']}/v1/completions,model=tiny,tokenizer={served['base']},"
                   "tokenized_requests=True,num_concurrent=1,max_retries=1")
    offline = run_mc(task, "hf", f"pretrained={served['base']}")
    assert endpoint[0] == offline[0]
    for served_scores, model_scores in zip(endpoint[1], offline[1]):
        assert max(range(3), key=served_scores.__getitem__) == max(range(3), key=model_scores.__getitem__)
        assert max(abs(a - b) for a, b in zip(served_scores, model_scores)) < 1e-3


SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["positive", "negative"]},
                                           "sure": {"type": "boolean"}},
          "required": ["label", "sure"], "additionalProperties": False}


def test_response_format_json_schema_constrains_the_answer_to_parse_against_the_schema(client, served):
    import json as _json

    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    for name in ("alpha", "beta", "tiny"):
        reply = client.chat.completions.create(model=name, messages=CHAT, max_tokens=48, response_format=fmt)
        jsonschema.validate(_json.loads(reply.choices[0].message.content), SCHEMA)
        assert reply.choices[0].finish_reason == "stop"
    free = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=MAX_TOKENS).choices[0].message.content
    assert free == served["expected"]["alpha"]["chat"]  # unconstrained requests are unchanged
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="beta", messages=CHAT, max_tokens=48, response_format=fmt, stream=True))
    jsonschema.validate(_json.loads(streamed), SCHEMA)
    loose = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=8, response_format={"type": "json_object"})
    assert loose.choices[0].message.content.lstrip()[:1] in ("{", "[")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
