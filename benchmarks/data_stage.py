"""Benchmark of the data stage on synthetic records with planted duplicates (run on demand).

    .venv/bin/python benchmarks/data_stage.py --records 100000

Generates N alpaca records (20-40 random words each, so unrelated records share almost no
word 3-grams) of which ~4% are exact duplicates (case/spacing variants) and ~4% near
duplicates (1-2 words of the output replaced: Jaccard about 0.8-0.95 on word 3-grams) of
earlier records; runs the whole stage (Great Expectations included); and reports records/s,
peak RSS, near-duplicate recall and precision against the planted ground truth, and the
near-duplicate step alone against datasketch MinHashLSH at the same settings (num_perm,
threshold, word 3-gram shingles), datasketch on a subsample, as docs/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunepipe.schemas.data import DataConfig, DedupConfig
from tunepipe.tasks.data.stage import DataStage
from tunepipe.tasks.data.dedup import near_duplicates
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.stage import StageContext


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))


def generate(path: Path, n: int, seed: int = 0) -> tuple[dict[int, int], set[int]]:
    """Write n records; return {near-dup line: original line} and the exact-dup lines."""
    rng = random.Random(seed)
    vocab = [_word(rng) for _ in range(50_000)]
    near: dict[int, int] = {}
    exact: set[int] = set()
    originals: list[tuple[str, list[str]]] = []
    original_lines: list[int] = []
    with open(path, "w") as handle:
        for line in range(1, n + 1):
            roll = rng.random()
            if originals and roll < 0.04:
                instruction, words = rng.choice(originals)
                record = {"instruction": instruction.upper(), "output": "  ".join(words)}
                exact.add(line)
            elif originals and roll < 0.08:
                index = rng.randrange(len(originals))
                instruction, words = originals[index]
                words = list(words)
                for _ in range(1 if rng.random() < 0.7 else 2):
                    words[rng.randrange(len(words))] = rng.choice(vocab)
                record = {"instruction": instruction, "output": " ".join(words)}
                near[line] = (index, _jaccard(f"{instruction} {' '.join(originals[index][1])}", f"{instruction} {record['output']}"))
            else:
                instruction = " ".join(rng.choices(vocab, k=rng.randint(4, 8)))
                words = rng.choices(vocab, k=rng.randint(20, 40))
                originals.append((instruction, words))
                original_lines.append(line)
                record = {"instruction": instruction, "output": " ".join(words)}
            handle.write(json.dumps(record) + "\n")
    return {line: (original_lines[index], j) for line, (index, j) in near.items()}, exact


def _shingles(text: str, n: int = 3) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def _jaccard(a: str, b: str) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def datasketch_docs_per_s(texts: list[str], config: DedupConfig) -> float:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    for index, text in enumerate(texts):
        words = text.lower().split()
        shingles = {" ".join(words[i:i + config.ngram]) for i in range(max(1, len(words) - config.ngram + 1))}
        minhash = MinHash(num_perm=config.num_perm, seed=config.seed)
        minhash.update_batch([s.encode() for s in shingles])
        lsh.query(minhash)
        lsh.insert(index, minhash)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--datasketch-sample", type=int, default=20_000, help="docs datasketch indexes (it is slow)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_only:  # child process: keeps the generator's memory out of the stage's peak RSS
        near_truth, exact_truth = generate(Path(args.workdir) / "records.jsonl", args.records)
        (Path(args.workdir) / "truth.json").write_text(json.dumps({"near": near_truth, "exact": sorted(exact_truth)}))
        return
    logging.basicConfig(level=logging.WARNING)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "records.jsonl"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--generate-only", "--records", str(args.records), "--workdir", str(work)], check=True)
    truth = json.loads((work / "truth.json").read_text())
    near_truth = {int(k): tuple(v) for k, v in truth["near"].items()}
    exact_truth = set(truth["exact"])
    generate_s = time.perf_counter() - t0

    config = DataConfig.model_validate({"sources": [{"path": str(source), "format": "alpaca", "task": "synthetic"}]})
    out = work / "out"
    out.mkdir(exist_ok=True)
    ctx = StageContext("data", "bench", out, {}, load_environment("cpu"), logging.getLogger("bench"))
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    output = DataStage().run(config, ctx)
    stage_s = time.perf_counter() - t0
    stage_rss = peak_rss_mib()
    report = json.loads((out / "report.json").read_text())

    # Scoring: a planted near duplicate is found when it is rejected as near_duplicate (or as
    # contamination, which also means "similar to a kept record"); precision counts the
    # near_duplicate rejections that were planted (as near or exact duplicates).
    rejected = {}
    with open(out / "rejected.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            rejected[int(row["source"].rsplit(":", 1)[1])] = row["reason"]
    # Recall is over planted pairs whose true Jaccard (word 3-grams) reaches the threshold:
    # those below it are not near duplicates by definition, whatever was planted.
    should_find = [line for line, (_, j) in near_truth.items() if j >= config.dedup.threshold]
    near_found = sum(1 for line in should_find if rejected.get(line) == "near_duplicate")
    flagged = [line for line, reason in rejected.items() if reason == "near_duplicate"]
    true_flags = sum(1 for line in flagged if line in near_truth or line in exact_truth)
    recall = near_found / len(should_find) if should_find else 1.0
    precision = true_flags / len(flagged) if flagged else 1.0

    # The near-duplicate step alone, rensa path vs datasketch, same settings and shingles.
    texts = []
    with open(source) as handle:
        for line in handle:
            record = json.loads(line)
            texts.append(f"{record['instruction']} {record['output']}")
    dedup = config.dedup
    t0 = time.perf_counter()
    near_duplicates(texts, dedup)
    rensa_docs_s = len(texts) / (time.perf_counter() - t0)
    sample = texts[: args.datasketch_sample]
    datasketch_rate = datasketch_docs_per_s(sample, dedup)

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}, python {platform.python_version()}",
        "command": " ".join(["benchmarks/data_stage.py", *sys.argv[1:]]),
        "records": args.records,
        "generate_s": round(generate_s, 1),
        "stage_s": round(stage_s, 1),
        "records_per_s": round(args.records / stage_s),
        "peak_rss_mib": round(max(stage_rss, rss_before)),
        "timings_s": {k.removeprefix("seconds_"): v for k, v in output.metrics.items() if k.startswith("seconds_")},
        "kept": report["kept"],
        "rejected": report["rejected"],
        "planted_near": len(near_truth),
        "planted_near_at_or_above_threshold": len(should_find),
        "planted_exact": len(exact_truth),
        "near_recall": round(recall, 4),
        "near_precision": round(precision, 4),
        "near_dup_step_docs_per_s_rensa": round(rensa_docs_s),
        "near_dup_step_docs_per_s_datasketch": round(datasketch_rate),
        "datasketch_sample": len(sample),
        "speedup": round(rensa_docs_s / datasketch_rate, 1),
        "num_perm": dedup.num_perm,
        "threshold": dedup.threshold,
        "ngram": dedup.ngram,
        "metrics": output.metrics,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
