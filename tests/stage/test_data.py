"""The data stage end to end on the dirty fixture (tests/fixtures/data): every count, exactly."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tunepipe.schemas.data import DataConfig
from tunepipe.schemas.records import PreferenceRecord, TextRecord, parse_sft
from tunepipe.tasks.core.loading import validate_yaml_mapping
from tunepipe.tasks.data.stage import DataStage
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.stage import StageContext, StageFailed, identify

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"
CAPITAL_Q = "Name the capital city of France and explain briefly why it became the capital."
OUTPUTS = ("train.jsonl", "validation.jsonl", "test.jsonl", "preferences.jsonl", "corpus.jsonl")


def load_config(fixtures: Path = FIXTURES, **overrides) -> DataConfig:
    data = yaml.safe_load((fixtures / "data.yaml").read_text())["data"]
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate_yaml_mapping(DataConfig, data, text=None, source="data.yaml", context={"base_dir": str(fixtures)})


def run(config: DataConfig, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext("data", "test", out, {}, load_environment("cpu"), logging.getLogger("test.data"))
    return DataStage().run(config, ctx)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    output = run(load_config(), out)
    return output, out, json.loads((out / "report.json").read_text())


def expected_locations() -> Counter:
    """Every input record's `file:line`, found independently of the stage's readers."""
    found: Counter = Counter()
    for name in ("alpaca.jsonl", "messages.jsonl", "prefs.jsonl", "capitals.jsonl"):
        for number, line in enumerate((FIXTURES / name).read_text().splitlines(), start=1):
            if line.strip():
                found[f"{name}:{number}"] += 1
    text = (FIXTURES / "sharegpt.json").read_text().splitlines()
    for number, line in enumerate(text, start=1):
        if line in (" {", "[{"):  # json.dumps(indent=1) starts each element on its own line
            found[f"sharegpt.json:{number}"] += 1
    for row in range(2, 2 + 6):  # csv: header on line 1, six one-line rows
        found[f"qa.csv:{row}"] += 1
    for row in range(1, pq.read_metadata(FIXTURES / "summaries.parquet").num_rows + 1):
        found[f"summaries.parquet:{row}"] += 1
    previous_blank = True
    for number, line in enumerate((FIXTURES / "corpus.txt").read_text().splitlines(), start=1):
        if line.strip() and previous_blank:
            found[f"corpus.txt:{number}"] += 1
        previous_blank = not line.strip()
    return found


def test_every_count_in_the_report(result):
    _, _, report = result
    assert report["read"] == 62
    assert report["rejected"] == {
        "contamination": 4,
        "empty_output": 4,
        "exact_duplicate": 3,
        "invalid_messages": 2,
        "malformed_json": 1,
        "missing_field": 3,
        "near_duplicate": 2,
        "not_an_object": 1,
        "rule:no-ai-disclaimer": 1,
        "unknown_format": 1,
    }
    assert report["rejected_total"] == 22
    assert report["kept"] == 40
    assert report["splits"] == {"train": 18, "validation": 7, "test": 8}
    assert report["tasks"] == {
        "capitals": {"train": 2, "validation": 2, "test": 2},
        "chat": {"train": 4, "validation": 1, "test": 1},
        "general": {"train": 8, "validation": 2, "test": 3},
        "qa": {"train": 2, "validation": 1, "test": 1},
        "summarize": {"train": 2, "validation": 1, "test": 1},
    }
    assert report["preferences"]["total"] == 4
    assert report["preferences"]["tasks"] == {"pref": {"train": 2, "validation": 1, "test": 1}}
    assert report["corpus"] == 3
    assert report["train_after_mix"] == 18
    assert report["pii"] == {"email": 1, "phone": 1}
    assert report["cleaning"] == {"html_records": 2, "control_char_records": 1, "nfkc_changed_records": 1}
    assert {k: report["dedup"][k] for k in ("exact_duplicates", "near_duplicates", "contamination", "num_bands")} == {
        "exact_duplicates": 3, "near_duplicates": 2, "contamination": 4, "num_bands": 16,
    }
    assert report["files"] == {
        "alpaca.jsonl": {"kept": 13, "read": 21, "rejected": 8},
        "capitals.jsonl": {"kept": 6, "read": 11, "rejected": 5},
        "corpus.txt": {"kept": 3, "read": 4, "rejected": 1},
        "messages.jsonl": {"kept": 3, "read": 4, "rejected": 1},
        "prefs.jsonl": {"kept": 4, "read": 6, "rejected": 2},
        "qa.csv": {"kept": 4, "read": 6, "rejected": 2},
        "sharegpt.json": {"kept": 3, "read": 5, "rejected": 2},
        "summaries.parquet": {"kept": 4, "read": 5, "rejected": 1},
    }
    assert report["validation"]["blocking_failures"] == 0
    assert report["read"] == report["kept"] + report["rejected_total"]


def test_metrics_summary_and_table(result):
    output, _, report = result
    m = output.metrics
    assert (m["read"], m["kept"], m["rejected"], m["train"], m["validation"], m["test"]) == (62, 40, 22, 18, 7, 8)
    assert (m["preferences"], m["corpus"], m["exact_duplicates"], m["near_duplicates"], m["contamination"]) == (4, 3, 3, 2, 4)
    assert m["rejected_fraction"] == pytest.approx(22 / 62, abs=1e-6)
    json.dumps(m)  # manifest/CLI need JSON
    assert "Read **62** records, kept **40**" in output.summary
    rows = {(r["family"], r["task"]): r for r in output.table}
    assert rows[("sft", "general")] == {"family": "sft", "task": "general", "train": 8, "validation": 2, "test": 3, "train_after_mix": 8}
    assert rows[("text", "corpus")]["train"] == 3


def test_nothing_is_lost(result):
    _, out, report = result
    seen: Counter = Counter()
    for name in OUTPUTS:
        for row in lines(out / name):
            seen[row["source"]] += 1
    rejected = lines(out / "rejected.jsonl")
    for row in rejected:
        seen[row["source"]] += 1
    assert seen == expected_locations()  # every input record exactly once, nothing invented
    assert sum(seen.values()) == report["read"]
    assert Counter(r["reason"] for r in rejected) == Counter(report["rejected"])
    malformed = next(r for r in rejected if r["reason"] == "malformed_json")
    assert malformed["source"] == "alpaca.jsonl:6" and malformed["record"].startswith('{"instruction": "broken line"')
    missing = next(r for r in rejected if r["source"] == "summaries.parquet:3")
    assert missing["reason"] == "missing_field" and missing["record"]["summary"] is None


def test_outputs_follow_the_record_schemas(result):
    _, out, _ = result
    ids = []
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        for row in lines(out / name):
            ids.append(parse_sft(row).id)
    prefs = [PreferenceRecord.model_validate(r) for r in lines(out / "preferences.jsonl")]
    corpus = [TextRecord.model_validate(r) for r in lines(out / "corpus.jsonl")]
    assert len(ids) == len(set(ids)) == 33
    assert Counter(p.split for p in prefs) == {"train": 2, "validation": 1, "test": 1}
    assert len(corpus) == 3


def test_cleaning_reached_the_outputs(result):
    _, out, _ = result
    by_source = {r["source"]: r for name in OUTPUTS for r in lines(out / name)}
    assert by_source["alpaca.jsonl:2"]["instruction"] == "Describe the water cycle in one sentence."
    assert by_source["alpaca.jsonl:2"]["output"] == "Water evaporates, condenses into clouds & falls again as rain."
    assert by_source["alpaca.jsonl:10"]["output"] == "Email <EMAIL> or call <PHONE> during office hours."
    assert by_source["alpaca.jsonl:11"]["instruction"] == "Define entropy in physics."
    assert by_source["alpaca.jsonl:11"]["output"] == "Entropy measures disorder; fine-grained states 1 count."
    history = by_source["alpaca.jsonl:12"]
    assert [m["role"] for m in history["messages"]] == ["user", "assistant", "user", "assistant"]
    assert by_source["sharegpt.json:14"]["messages"][0] == {"role": "system", "content": "You are a friendly tutor."}
    assert by_source["qa.csv:5"]["output"] == "366"
    assert by_source["corpus.txt:1"]["text"].count("\n") == 1  # paragraph lines kept as lines


def test_duplicates_and_contamination(result):
    _, out, _ = result
    rejected = {r["source"]: r for r in lines(out / "rejected.jsonl")}
    assert rejected["alpaca.jsonl:3"]["reason"] == "exact_duplicate"
    assert rejected["messages.jsonl:1"]["reason"] == "exact_duplicate"  # across sources
    assert rejected["corpus.txt:6"]["reason"] == "exact_duplicate"
    assert rejected["alpaca.jsonl:5"]["reason"] == "near_duplicate"
    assert rejected["qa.csv:4"]["reason"] == "near_duplicate"  # across sources and tasks
    train = lines(out / "train.jsonl")
    evaluation = lines(out / "validation.jsonl") + lines(out / "test.jsonl")
    same_prompt_eval = [r for r in evaluation if r.get("instruction") == CAPITAL_Q]
    contaminated = [r for r in rejected.values() if r["reason"] == "contamination"]
    assert len(same_prompt_eval) >= 1
    assert not [r for r in train if r.get("instruction") == CAPITAL_Q]
    assert len(contaminated) == 5 - len(same_prompt_eval) == 4
    assert all(r["record"]["instruction"] == CAPITAL_Q for r in contaminated)


def test_same_input_same_output_wherever_it_lives(result, tmp_path):
    _, out, _ = result
    moved = tmp_path / "elsewhere"
    shutil.copytree(FIXTURES, moved)
    config_a, config_b = load_config(), load_config(moved)
    assert config_a.sources[0].path != config_b.sources[0].path
    env = load_environment("cpu")
    assert identify(DataStage(), config_a, {}, env).key == identify(DataStage(), config_b, {}, env).key
    run(config_b, tmp_path / "again")
    for name in (*OUTPUTS, "rejected.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    (moved / "qa.csv").write_text((moved / "qa.csv").read_text() + "Is this new?,Yes it is new.\n")
    assert identify(DataStage(), load_config(moved), {}, env).key != identify(DataStage(), config_a, {}, env).key


def test_blocking_rule_fails_with_counts_and_paths(tmp_path):
    rules = [{"column": "prompt", "regex": "^Explain", "mode": "not_match", "blocking": True, "name": "no-explain"}]
    with pytest.raises(StageFailed) as failure:
        run(load_config(validation__rules=rules), tmp_path)
    message = str(failure.value)
    assert "expectation 'rule no-explain' failed for 1 row(s)" in message
    assert str(tmp_path / "rejected.jsonl") in message and str(tmp_path / "report.json") in message
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["validation"]["blocking_failures"] == 1
    assert (tmp_path / "validation.json").exists() and lines(tmp_path / "rejected.jsonl")


def test_rejected_fraction_limit(tmp_path):
    with pytest.raises(StageFailed, match=r"rejected 21 of 62 records \(33.9%\) > max_rejected_fraction 30%"):
        run(load_config(max_rejected_fraction=0.3, validation__enabled=False), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["rejected_total"] == 21  # validation off: the rule did not run


def test_mixing_counts_copies_apart(tmp_path):
    config = load_config(mix={"ratios": {"general": 3, "chat": 1}, "total": 20, "caps": {"capitals": 1}}, validation__enabled=False)
    output = run(config, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mix"]["general"] == {"before": 8, "after": 15, "upsampled_copies": 7, "downsampled": 0}
    assert report["mix"]["chat"] == {"before": 4, "after": 5, "upsampled_copies": 1, "downsampled": 0}
    assert report["mix"]["capitals"] == {"before": 2, "after": 1, "upsampled_copies": 0, "downsampled": 1}
    train = lines(tmp_path / "train.jsonl")
    assert len(train) == report["train_after_mix"] == output.metrics["train_after_mix"] == 15 + 5 + 1 + 2 + 2
    assert len({r["id"] for r in train}) == report["splits"]["train"] == 17
    assert report["rejected"]["mix_downsampled"] == 1
    assert report["read"] == report["kept"] + report["rejected_total"]
    assert output.metrics["rejected_fraction"] == pytest.approx(21 / 62, abs=1e-6)  # mixing is not a quality loss (rule off: 21)


DEGENERATE_PAIRS = [
    {"prompt": "Suggest a name for a goldfish.", "chosen": "How about Bubbles?", "rejected": "how about   BUBBLES?"},
    {"prompt": "Give a sleep tip.", "chosen": "Keep a regular bedtime.", "rejected": "   "},
    {"prompt": "Recommend a novel.", "chosen": "", "rejected": "Try Moby-Dick."},
]


def degenerate_config(tmp_path: Path, **extra) -> DataConfig:
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": f"Question number {i} about the weather today?", "output": f"Answer {i}: it is sunny and warm."} for i in range(6)
    ]))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DEGENERATE_PAIRS))
    data = {"sources": [{"path": "good.jsonl", "format": "alpaca"}, {"path": "pairs.jsonl", "format": "preference"}],
            "split": {"validation": 0.0, "test": 0.0}, "validation": {"enabled": False}, "max_rejected_fraction": 1.0, **extra}
    return validate_yaml_mapping(DataConfig, data, text=None, source="data.yaml", context={"base_dir": str(tmp_path)})


def test_degenerate_preference_pairs_are_rejected_and_an_all_rejected_source_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="test.data"):
        run(degenerate_config(tmp_path), tmp_path / "out")
    rejected = {r["source"]: (r["reason"], r["detail"]) for r in lines(tmp_path / "out" / "rejected.jsonl")}
    assert rejected == {
        "pairs.jsonl:1": ("identical_pair", "chosen and rejected are the same text after normalisation (case, whitespace)"),
        "pairs.jsonl:2": ("empty_output", "the rejected response is empty after cleaning"),
        "pairs.jsonl:3": ("empty_output", "the chosen response is empty after cleaning"),
    }
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["preferences"]["total"] == 0 and report["kept"] == 6
    assert report["warnings"] == ["every record of pairs.jsonl was rejected (3 read); see rejected.jsonl"]
    assert "every record of pairs.jsonl was rejected" in caplog.text
    assert not lines(tmp_path / "out" / "preferences.jsonl")


def test_an_all_rejected_source_fails_when_configured(tmp_path):
    with pytest.raises(StageFailed, match=r"every record of pairs.jsonl was rejected \(3 read\); see rejected.jsonl \(fail_on_empty_source\)"):
        run(degenerate_config(tmp_path, fail_on_empty_source=True), tmp_path / "out")
