"""The one loader of user files: YAML without 1.1 surprises or silent duplicates, unreadable files
named, data paths checked at validate time, and the CLI's exit code 2 with `file:line`."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from tunepipe.flows.cli.main import main
from tunepipe.tasks.core.config import load_pipeline_config
from tunepipe.tasks.core.loading import ConfigError, parse_yaml

MINIMAL = """\
name: t
workdir: work
data:
  sources:
    - {path: data.jsonl, format: alpaca, task: demo}
"""


def write(tmp_path, text: str, name: str = "pipeline.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    return path


def test_readme_notifications_example_validates_with_its_on_key(tmp_path):
    # The README's own example: under YAML 1.1 the key `on` became True and the config was refused.
    path = write(tmp_path, MINIMAL + "notifications:\n  webhook_url: http://127.0.0.1:9/hook\n  on: [failure, gate]\n")
    assert load_pipeline_config(path).notifications.on == ["failure", "gate"]


def test_yaml_1_1_booleans_stay_strings_true_false_stay_booleans():
    assert parse_yaml("a: on\nb: yes\nc: no\nd: off\ne: y\nf: true\ng: False\nno: 1\n", "x.yaml") == {
        "a": "on", "b": "yes", "c": "no", "d": "off", "e": "y", "f": True, "g": False, "no": 1,
    }


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    path = write(tmp_path, MINIMAL + "sft:\n  epochs: 1\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:8: duplicate key 'epochs' \(first given at line 7\)"):
        load_pipeline_config(path)
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_pipeline_config(write(tmp_path, "name: a\n" + MINIMAL, "top.yaml"))


def test_directory_non_utf8_and_syntax_errors_are_named(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match="adir: is a directory, not a config file"):
        load_pipeline_config(tmp_path / "adir")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: t\nworkdir: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml:2: the config file is not UTF-8 text \(byte 0xe9"):
        load_pipeline_config(bad)
    broken = write(tmp_path, "name: t\ndata: [unclosed\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken.yaml:3: not valid YAML"):
        load_pipeline_config(broken)


def test_mistyped_relative_data_path_fails_at_validate_time(tmp_path):
    # `data/nope.jsonl` matches owner/name; it was taken for a hub id and failed at run time.
    path = write(tmp_path, MINIMAL.replace("path: data.jsonl", "path: data/nope.jsonl"))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path \(line 5\): .*data/nope.jsonl: no such file"):
        load_pipeline_config(path)
    # A name without a file suffix, under a local directory of that owner name: a missing file too.
    (tmp_path / "corpora").mkdir()
    with pytest.raises(ConfigError, match="corpora/missing: no such file"):
        load_pipeline_config(write(tmp_path, MINIMAL.replace("path: data.jsonl", "path: corpora/missing"), "dir.yaml"))
    # A plausible hub id stays one (read through datasets at run time).
    config = load_pipeline_config(write(tmp_path, MINIMAL.replace("path: data.jsonl", "path: teknium/OpenHermes-2.5"), "hub.yaml"))
    assert config.data.sources[0].path == "teknium/OpenHermes-2.5" and config.data.sources[0].is_remote


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "{config}", "--until", "nosuchstage"], "--until nosuchstage: not a configured stage (data)"),
        (["validate", "{dir}"], "is a directory, not a config file"),
        (["validate", "{dup}"], "duplicate key 'workdir'"),
    ],
)
def test_cli_config_errors_exit_2_without_a_traceback(tmp_path, capsys, args, message):
    paths = {"config": write(tmp_path, MINIMAL), "dir": tmp_path, "dup": write(tmp_path, MINIMAL + "workdir: other\n", "dup.yaml")}
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "errors.pydantic.dev" not in err


def test_a_json_file_holding_one_object_says_so(tmp_path):
    from tunepipe.schemas.data import SourceConfig
    from tunepipe.tasks.data.sources import Malformed, files_to_read, read_file

    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}], "version": 2}))
    config = SourceConfig(path=str(tmp_path / "wrapped.json"))
    ((location, raw),) = [item for f, kind, label in files_to_read(config) for item in read_file(f, kind, label, config)]
    assert location == "wrapped.json:1" and isinstance(raw, Malformed) and raw.reason == "json_not_a_list"
    assert re.search(r"one JSON object \(keys: data, version\), not an array of records.*key 'data' holds a list", raw.error)
