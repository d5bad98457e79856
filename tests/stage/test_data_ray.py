"""The data stage's `ray` engine on a local multi-node Ray cluster gives the local engine's files.

One cluster per module (Ray's start-up is the slow part): a head with no CPUs (it only
coordinates) and two worker nodes with one CPU each, so every Ray Data task runs on a worker
node. The quickstart's data and the dirty fixture go through both engines; every published
file (report.json and validation.json included) must be the same bytes, and the stage key must
not change.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import yaml

from tunepipe.schemas.data import DataConfig
from tunepipe.tasks.core.loading import validate_yaml_mapping
from tunepipe.tasks.data.stage import DataStage
from tests.stage.test_data import OUTPUTS, load_config, run

ray = pytest.importorskip("ray", reason="Ray is the optional `ray` extra (pip install tunepipe[ray])")
pytest.importorskip("ray.data", reason="Ray Data is part of the `ray` extra (ray[data])")

pytestmark = pytest.mark.distributed
OBJECT_STORE = 80 * 2**20  # Ray's minimum is 75 MiB; the fixtures are kilobytes
QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    print(f"ray cluster up in {time.perf_counter() - started:.1f} s")
    yield cluster
    cluster.shutdown()


def quickstart_config(**fields) -> DataConfig:
    data = yaml.safe_load((QUICKSTART / "pipeline.yaml").read_text())["data"] | fields
    return validate_yaml_mapping(DataConfig, data, text=None, source="pipeline.yaml", context={"base_dir": str(QUICKSTART)})


def _same_artifact(local: Path, distributed: Path) -> None:
    for name in (*OUTPUTS, "rejected.jsonl", "report.json", "validation.json"):
        mine, theirs = local / name, distributed / name
        assert mine.exists() == theirs.exists(), f"{name} published by one engine only"
        if mine.exists():
            assert theirs.read_bytes() == mine.read_bytes(), f"{name} differs between the engines"


def word_tokenizer(path: Path) -> str:
    """A tokenizer.json counting words and punctuation (the token bounds run on the workers)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))
    return str(path)


@pytest.mark.parametrize("which", ["quickstart", "fixtures"])
def test_ray_engine_publishes_the_local_engines_files(tmp_path, ray_cluster, caplog, which):
    if which == "quickstart":
        make = quickstart_config
    else:
        tokens = {"clean__tokenizer": word_tokenizer(tmp_path / "tokenizer.json"), "clean__min_tokens": 12}
        make = lambda **fields: load_config(**tokens, **fields)  # noqa: E731
    address = {"address": ray_cluster.address}
    local_config, ray_config = make(), make(engine="ray", ray=address)
    assert DataStage().key_payload(ray_config) == DataStage().key_payload(local_config)
    run(local_config, tmp_path / "local")
    caplog.set_level(logging.INFO, logger="test.data")
    run(ray_config, tmp_path / "ray")
    _same_artifact(tmp_path / "local", tmp_path / "ray")
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert report["read"] == report["kept"] + report["rejected_total"] > 0
    if which == "fixtures":  # the dirty data exercises every rejection the Ray steps make
        assert {"exact_duplicate", "near_duplicate", "contamination", "malformed_json", "too_few_tokens"} <= set(report["rejected"])
    nodes = [r.getMessage() for r in caplog.records if "Ray node(s)" in r.getMessage()]
    assert nodes and nodes[-1].endswith("on 2 Ray node(s)"), nodes
