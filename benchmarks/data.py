"""The data stage's engines side by side on synthetic records (run on demand, on an idle machine).

    .venv/bin/python benchmarks/data.py --records 1000000 5000000
    .venv/bin/python benchmarks/data.py --records 20000              # a smoke-sized run

For each size: the records of `benchmarks/data_stage.py`'s generator (alpaca, ~4% exact and
~4% near duplicates planted) written as `--shards` jsonl files (the `ray` engine reads one task
per file), then the whole stage (Great Expectations included) once per engine variant, each in
its own process so peak RSS is that variant's alone:

- `local`: the local engine;
- `streaming`: `engine: streaming` (records spilled to disk in batches; Great Expectations runs
  over frames of 50,000 rows; `--no-validation` leaves validation out of every variant);
- `ray-1`, `ray-2`: `engine: ray` on a local Ray cluster (ray.cluster_utils) of a head with no
  CPUs and 1 or 2 worker nodes of 1 CPU each.

Reported per variant: wall time of the stage run (the Ray cluster's start-up is measured apart),
peak RSS of the driver (for Ray also its peak private RSS: RSS less the shared pages of the object
store it maps, sampled every 0.2 s), the largest peak RSS of any Ray process and the peak sum over Ray
processes (sampled every 0.2 s with psutil), and whether every output file equals the local
engine's, byte for byte.
Ratios are against `local` of the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("local", "streaming", "ray-1", "ray-2")
OUTPUTS = ("train.jsonl", "validation.jsonl", "test.jsonl", "preferences.jsonl", "corpus.jsonl", "rejected.jsonl", "report.json", "validation.json")
OBJECT_STORE = 512 * 2**20


def write_shards(work: Path, records: int, shards: int) -> Path:
    """The generator's records split round-robin-free (contiguous) into `shards` files."""
    single = work / "records.jsonl"
    if not single.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_stage.py"), "--generate-only", "--records", str(records), "--workdir", str(work)], check=True)
    folder = work / "shards"
    if folder.exists():
        return folder
    folder.mkdir()
    per = -(-records // shards)
    with open(single) as source:
        for index in range(shards):
            with open(folder / f"part-{index:03d}.jsonl", "w") as handle:
                for _ in range(per):
                    line = source.readline()
                    if not line:
                        break
                    handle.write(line)
    return folder


def fingerprint(out: Path) -> dict[str, str]:
    """Digest of every published file (the same key publishes the same bytes)."""
    digests = {}
    for name in OUTPUTS:
        path = out / name
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "absent"
    return digests


class RaySampler(threading.Thread):
    """Peak RSS of Ray's processes (raylets, workers) started by this process, sampled; and the
    driver's own peak private RSS (RSS less shared pages: the driver maps the head node's object
    store, and the blocks it reads back count in its RSS while they stay in that store)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_process = self.peak_total = self.peak_driver_private = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(0.2):
            mine = me.memory_info()
            self.peak_driver_private = max(self.peak_driver_private, mine.rss - mine.shared)
            total = 0
            for child in me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peak_process = max(self.peak_process, rss)
            self.peak_total = max(self.peak_total, total)


def run_variant(variant: str, shards: Path, out: Path, validation: bool = True) -> dict:
    """One stage run in this process (a child of the benchmark)."""
    from tunepipe.schemas.data import DataConfig
    from tunepipe.tasks.core.environment import load_environment
    from tunepipe.tasks.core.stage import StageContext
    from tunepipe.tasks.data.stage import DataStage

    logging.basicConfig(level=logging.WARNING)
    fields: dict = {"sources": [{"path": str(shards), "format": "alpaca", "task": "synthetic"}], "validation": {"enabled": validation}}
    if variant == "streaming":
        fields["engine"] = "streaming"
    result: dict = {"variant": variant}
    cluster = sampler = None
    if variant.startswith("ray-"):
        from ray.cluster_utils import Cluster

        started = time.perf_counter()
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE})
        for _ in range(int(variant.split("-")[1])):
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        result["cluster_start_s"] = round(time.perf_counter() - started, 1)
        fields |= {"engine": "ray", "ray": {"address": cluster.address}}
        sampler = RaySampler()
        sampler.start()
    config = DataConfig.model_validate(fields)
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext("data", "bench", out, {}, load_environment("cpu"), logging.getLogger("bench"))
    started = time.perf_counter()
    output = DataStage().run(config, ctx)
    result["stage_s"] = round(time.perf_counter() - started, 1)
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 1)  # a loaded machine's times are not an idle one's
    result["driver_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if sampler is not None:
        sampler.stop.set()
        sampler.join()
        result["driver_peak_private_rss_mib"] = round(sampler.peak_driver_private / 2**20)
        result["ray_process_peak_rss_mib"] = round(sampler.peak_process / 2**20)
        result["ray_total_peak_rss_mib"] = round(sampler.peak_total / 2**20)
    if cluster is not None:
        cluster.shutdown()
    result["timings_s"] = {k.removeprefix("seconds_"): v for k, v in output.metrics.items() if k.startswith("seconds_")}
    result["outputs"] = fingerprint(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--shards", type=int, default=8, help="jsonl files the records are split into")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-validation", action="store_true", help="validation.enabled false in every variant (Great Expectations' runs left out)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child process: one variant, JSON on stdout
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-engines-"))
    if args.variant:
        print(json.dumps(run_variant(args.variant, work / "shards", work / f"out-{args.variant}", not args.no_validation)))
        return
    rows = []
    for records in args.records:
        size_dir = work / f"n{records}"
        size_dir.mkdir(parents=True, exist_ok=True)
        write_shards(size_dir, records, args.shards)
        results = {}
        for variant in args.variants:
            flags = ["--no-validation"] if args.no_validation else []
            child = subprocess.run([sys.executable, __file__, "--variant", variant, "--workdir", str(size_dir), *flags], check=True, capture_output=True, text=True)
            results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
        base = results.get("local")
        for variant, result in results.items():
            result["records"] = records
            if base:
                result["same_outputs_as_local"] = result["outputs"] == base["outputs"]
                result["time_vs_local"] = round(result["stage_s"] / base["stage_s"], 2)
            rows.append(result)
    print(json.dumps({
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}, python {platform.python_version()}",
        "command": " ".join(["benchmarks/data.py", *sys.argv[1:]]),
        "results": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
