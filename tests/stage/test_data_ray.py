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
import tracemalloc
from pathlib import Path

import pytest
import yaml

from tunepipe.schemas.data import DataConfig
from tunepipe.tasks.core.loading import validate_yaml_mapping
from tunepipe.tasks.data.stage import DataStage
from tests.helpers.memory import traced_peak
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


def driver_peak_bytes(tmp_path: Path, count: int, address: str) -> int:
    """Peak traced bytes (numpy's included) of this process, the Ray driver, from the start of
    the stage's first pass (Ray joined, Ray Data's state built) to the end of a Ray-engine run
    of `count` short records."""
    from tests.stage.test_data_streaming import write_small_records

    tmp_path.mkdir(exist_ok=True)
    source = write_small_records(tmp_path / f"small-{count}.jsonl", count)
    config = DataConfig.model_validate({"sources": [{"path": str(source), "format": "alpaca", "task": "t"}], "engine": "ray",
                                        "ray": {"address": address, "batch_size": 200}, "validation": {"enabled": False}})
    return traced_peak(lambda: run(config, tmp_path / f"out-{count}"))


def test_ray_driver_memory_per_record_stays_small(tmp_path, ray_cluster, monkeypatch):
    """The driver reads the kept records back from Ray a batch at a time into the streaming
    engine's spill file and per-record columns; it never holds every record (a dict of every
    kept record, as the driver once collected, is ~1 KB per short record here). 1,000 vs 5,000
    short records, every batch-sized buffer small: the driver's peak from its first pass to the
    end grows by less than 150 bytes per added record."""
    from tunepipe.tasks.data import dedup, ray_engine, streaming

    monkeypatch.setattr(ray_engine, "_OUT_ROWS", 100)  # records read back per batch (the driver's side)
    monkeypatch.setattr(streaming, "BATCH", 200)  # contamination's prompts signed per batch
    monkeypatch.setattr(dedup, "PARTITION_ROWS", 500)
    monkeypatch.setattr(streaming, "WRITE_BUFFER", 1 << 12)
    monkeypatch.setattr(streaming, "_ROWS", 64)
    monkeypatch.setattr(streaming, "VERIFY_PAIRS", 64)
    first_pass = ray_engine.RayDataRun._first_pass

    def measured_from_here(self, *args):
        tracemalloc.reset_peak()  # Ray's own start-up state (~8 MB, whatever the input) is not the records'
        return first_pass(self, *args)

    monkeypatch.setattr(ray_engine.RayDataRun, "_first_pass", measured_from_here)
    driver_peak_bytes(tmp_path / "warm", 10, ray_cluster.address)  # imports and Ray Data's first-run state before measuring
    few, many = 1_000, 5_000
    growth = driver_peak_bytes(tmp_path, many, ray_cluster.address) - driver_peak_bytes(tmp_path, few, ray_cluster.address)
    print(f"driver: {growth / (many - few):.0f} bytes per record")
    assert growth / (many - few) < 150, growth / (many - few)
