"""The standing fuzz suite: property-based tests (hypothesis) of the error contract over what users
and clients send us. Config files: valid, or exit code 2 with a message naming the file and the
field, never a traceback. Data files: every record read is kept or rejected with a reason and its
`file:line`, nothing lost, nothing raised. Server requests: 200, or a 4xx in OpenAI's error
shape whose `param` names a field of the request, never a 500.

Deterministic (derandomized) so CI failures reproduce; about 20 s on 2 cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# At module level: FastAPI reads the endpoints' annotations (strings here) from this module's globals.
from tunepipe.tasks.serving.protocol import ChatCompletionRequest, CompletionRequest

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- config files ---------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["on", "no", "yes", "off", "", "auto", "cpu", "data", "sft", "../x", "owner/name", "a.jsonl", "${NOPE}"]),
    st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
SECTIONS = ["name", "workdir", "environment", "data", "sft", "align", "evaluate", "export", "deploy", "serve", "schedule",
            "watch", "notifications", "deployment", "bogus"]
DATA_KEYS = ["sources", "split", "clean", "dedup", "mix", "validation", "max_rejected_fraction", "fail_on_empty_source", "nope"]


def base_config(tmp: Path) -> dict:
    return {"name": "fuzz", "workdir": "work", "data": {"sources": [{"path": "data.jsonl", "format": "alpaca"}]}}


@st.composite
def mutated_configs(draw):
    config = {"name": "fuzz", "workdir": "work", "data": {"sources": [{"path": "data.jsonl", "format": "alpaca"}]}}
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "data", "source"]))
        if where == "top":
            config[draw(st.sampled_from(SECTIONS))] = draw(values)
        elif where == "data" and isinstance(config.get("data"), dict):
            config["data"][draw(st.sampled_from(DATA_KEYS))] = draw(values)
        elif isinstance(config.get("data"), dict) and isinstance(config["data"].get("sources"), list) and config["data"]["sources"]:
            source = config["data"]["sources"][0]
            if isinstance(source, dict):
                source[draw(st.sampled_from(["path", "format", "task", "file_type", "field_map", "text_unit", "extra"]))] = draw(values)
    return config


def validate_cli(path: Path, capsys) -> tuple[int, str]:
    from tunepipe.flows.cli.main import main

    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


def check_config_error(code: int, err: str, path: Path) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("tunepipe: config error\n") and str(path) in err, err  # the file is named
        lines = err.splitlines()[1:]
        # Every problem line names a field (with its line) or is a file-level problem with its line.
        problems = [l for l in lines if l.startswith("  ")]
        for problem in problems:
            assert re.match(r"  (\(top level\)|[A-Za-z_\[].*?)( \(line \d+\))?: \S", problem), problem


@FUZZ
@given(config=mutated_configs())
def test_fuzz_config_mappings(config, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("cfg")
    (tmp / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    check_config_error(*validate_cli(path, capsys), path)


@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))),
       raw=st.booleans())
def test_fuzz_config_text(text, raw, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("cfgtext")
    path = tmp / "pipeline.yaml"
    if raw:
        path.write_bytes(text.encode("latin-1", errors="replace"))  # not necessarily UTF-8
    else:
        path.write_text("name: fuzz\nworkdir: work\n" + text)
    code, err = validate_cli(path, capsys)
    assert code == 2 or code == 0, err
    assert "Traceback" not in err and (code == 0 or str(path) in err)


# -- data files -----------------------------------------------------------------------------------

texts = st.one_of(st.text(max_size=20), st.sampled_from(["", " ", "<b>x</b>", "same", "SAME ", "\u200b"]))
record_values = st.one_of(texts, st.none(), st.integers(), st.lists(texts, max_size=2),
                          st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]), "content": texts}), max_size=3))
records = st.one_of(
    st.dictionaries(st.sampled_from(["instruction", "input", "output", "prompt", "chosen", "rejected", "messages", "conversations",
                                     "text", "system", "task", "zzz"]), record_values, max_size=5),
    record_values,
)


def read_and_parse(path: Path, fmt: str) -> tuple[int, list[tuple[str, str]], int]:
    """(read, rejections as (location, reason), kept) through the stage's own reader, parser and cleaner."""
    from tunepipe.schemas.data import CleanConfig, SourceConfig
    from tunepipe.tasks.data.clean import Cleaner
    from tunepipe.tasks.data.formats import RecordError, parse_record
    from tunepipe.tasks.data.sources import Malformed, files_to_read, read_file

    source = SourceConfig(path=str(path), format=fmt)
    cleaner = Cleaner(CleanConfig(min_chars=1))
    read, rejected, kept = 0, [], 0
    for file, kind, label in files_to_read(source):
        for location, raw in read_file(file, kind, label, source):
            read += 1
            if type(raw) is Malformed:
                rejected.append((location, raw.reason))
                continue
            try:
                cleaner.clean_record(parse_record(raw, fmt, "t", {}, None))
                kept += 1
            except RecordError as error:
                assert error.reason and isinstance(error.detail, str)
                rejected.append((location, error.reason))
    return read, rejected, kept


@FUZZ
@given(rows=st.lists(records, max_size=6), fmt=st.sampled_from(["auto", "alpaca", "preference", "messages", "sharegpt", "text"]),
       layout=st.sampled_from(["jsonl", "json", "broken-jsonl"]))
def test_fuzz_data_files_lose_nothing(rows, fmt, layout, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    if layout == "json":
        path = tmp / "rows.json"
        path.write_text(json.dumps(rows, indent=1))
        expected = len(rows)
    else:
        path = tmp / "rows.jsonl"
        lines = [json.dumps(r) for r in rows]
        if layout == "broken-jsonl":
            lines = [line[: len(line) // 2] if i % 2 else line for i, line in enumerate(lines)]
        path.write_text("".join(line + "\n" for line in lines))
        expected = sum(1 for line in lines if line.strip())
    read, rejected, kept = read_and_parse(path, fmt)
    assert read == expected == kept + len(rejected)
    line_count = path.read_text().count("\n") + 1
    for location, reason in rejected:
        name, _, line = location.rpartition(":")
        assert name == path.name and 1 <= int(line) <= line_count and re.fullmatch(r"[a-z_]+", reason), location


@FUZZ
@given(obj=st.dictionaries(st.text(max_size=6), record_values, min_size=1, max_size=4))
def test_fuzz_a_json_object_file_says_it_is_not_a_list(obj, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obj")
    path = tmp / "one.json"
    path.write_text(json.dumps(obj))
    read, rejected, kept = read_and_parse(path, "auto")
    assert (read, kept, rejected) == (1, 0, [("one.json:1", "json_not_a_list")])


# Encodings and byte-order marks: the same records, whatever encoding and BOM they are saved with,
# read to the same records at the same lines (issue 29).
ENCODINGS = [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"),
             ("utf-32-le", b"\xff\xfe\x00\x00"), ("utf-32-be", b"\x00\x00\xfe\xff")]
safe_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"instruction": safe_text, "output": safe_text}), min_size=1, max_size=5),
       encoding=st.sampled_from(ENCODINGS), layout=st.sampled_from(["jsonl", "json", "csv"]))
def test_fuzz_encodings_and_boms_read_the_same_records(rows, encoding, layout, tmp_path_factory):
    import csv
    import io

    from tunepipe.schemas.data import SourceConfig
    from tunepipe.tasks.data.sources import files_to_read, read_file

    tmp = tmp_path_factory.mktemp("enc")
    if layout == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif layout == "json":
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()

    def read(codec: str, bom: bytes) -> list:
        path = tmp / f"rows-{codec}-{len(bom)}.{layout}"
        path.write_bytes(bom + text.encode(codec))
        source = SourceConfig(path=str(path), format="alpaca")
        return [(loc.rpartition(":")[2], raw) for file, kind, label in files_to_read(source) for loc, raw in read_file(file, kind, label, source)]

    assert read(*encoding) == read("utf-8", b"")
    assert [raw for _, raw in read(*encoding)] == rows


# Role order: a conversation is kept exactly when its roles are a possible chat (system first if
# any, then user/assistant alternating, tool results only after an assistant, ending in assistant);
# otherwise it is rejected with its reason, never kept or lost.
ROLES = ["system", "user", "assistant", "tool", "human", "gpt"]
CANONICAL = {"human": "user", "gpt": "assistant"}


def possible_order(roles: list[str]) -> bool:
    roles = [CANONICAL.get(r, r) for r in roles]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    allowed = {None: {"user"}, "user": {"assistant"}, "assistant": {"user", "tool"}, "tool": {"tool", "assistant"}}
    previous = None
    for role in roles:
        if role not in allowed[previous]:
            return False
        previous = role
    return previous == "assistant"


@FUZZ
@given(roles=st.lists(st.sampled_from(ROLES), min_size=1, max_size=6))
def test_fuzz_role_order(roles, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roles")
    path = tmp / "chats.jsonl"
    turns = [{"from": role, "value": f"turn {i} text"} for i, role in enumerate(roles)]
    path.write_text(json.dumps({"conversations": turns}) + "\n")
    read, rejected, kept = read_and_parse(path, "sharegpt")
    assert read == 1 and kept == int(possible_order(roles)), (roles, rejected)
    if rejected:
        assert rejected[0][0] == "chats.jsonl:1" and rejected[0][1] in ("role_order", "invalid_messages")


# -- server requests ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parsing_app():
    """The embedded server's request models and error handlers in front of an echo endpoint: the
    parsing layer alone, without a model (generation is tested in tests/integration)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tunepipe.tasks.serving.app import BodyLimit, _add_error_handlers

    app = FastAPI()
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=4096)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return {"prompt": body.prompt_text(), "stop": body.stop_strings(), "usage": body.include_usage()}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        return {"messages": [m.text() for m in body.messages], "stop": body.stop_strings(), "max_tokens": body.max_tokens}

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6,
)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
          "stream_options", "n", "user", "logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias",
          "presence_penalty", "frequency_penalty", "tools"]


@st.composite
def request_bodies(draw):
    body = {"model": "m", "max_tokens": 2}
    if draw(st.booleans()):
        body["prompt"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        body[name] = draw(json_values | st.sampled_from([1, 2, True, [], ["a"] * 5, {"include_usage": True}, "", "  "]))
    return body


def check_openai_answer(response, body_fields: set[str]) -> None:
    assert response.status_code in (200, 400, 413, 422) and response.status_code != 500, response.text
    if response.status_code == 200:
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in error["message"]
    param = error["param"]
    if param is not None:  # a field of the request, never a character offset
        assert not param.isdigit() and re.match(r"[A-Za-z_]", param), param
        assert param.split(".")[0].split("[")[0] in body_fields | {"model", "prompt", "messages"}, (param, body_fields)


@FUZZ
@given(body=request_bodies(), chat=st.booleans())
def test_fuzz_request_fields(parsing_app, body, chat):
    response = parsing_app.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
    check_openai_answer(response, set(body))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode),
                     request_bodies().map(lambda b: json.dumps(b).encode()).map(lambda s: s[: len(s) * 2 // 3])))
def test_fuzz_raw_bodies(parsing_app, raw):
    response = parsing_app.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    check_openai_answer(response, set())
