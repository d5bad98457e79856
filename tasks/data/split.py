"""Deterministic, stratified train/validation/test split and train-only task mixing.

Split: within each (family, task) group, records are ordered by a salted hash of their id; the
first round(n * validation) go to validation, the next round(n * test) to test, the rest to
train. Same records → same split, whatever the input order, and every task gets its share.

Mix: per-task ratios resample the train split of the listed tasks to the given proportions
(whole copies first, then a seeded sample of the remainder for upsampling; a seeded sample for
downsampling); caps then bound each task. Upsampled copies are extra lines in train.jsonl;
records dropped by downsampling go to rejected.jsonl (reason `mix_downsampled`), so nothing is
lost and `read == kept + rejected` still holds.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from collections import defaultdict

import numpy as np

from tunepipe.schemas.data import MixConfig, SplitConfig
from tunepipe.tasks.data.formats import FAMILY


def _rounded(value: float) -> int:
    return math.floor(value + 0.5)  # half up: round() would send 0.5 to 0 (banker's rounding)


def assign_splits(records: list[dict], config: SplitConfig) -> None:
    """Set `record["split"]` on every supervised and preference record (text records: none)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        family = FAMILY[record["kind"]]
        if family != "text":
            groups[(family, record["task"])].append(record)
    salt = f"{config.seed}:".encode()
    for members in groups.values():
        members.sort(key=lambda r: hashlib.blake2b(salt + r["id"].encode(), digest_size=8).digest())
        n = len(members)
        n_validation = _rounded(n * config.validation)
        n_test = min(_rounded(n * config.test), n - n_validation)
        for position, record in enumerate(members):
            record["split"] = "validation" if position < n_validation else "test" if position < n_validation + n_test else "train"


def _task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{task}".encode(), digest_size=8).digest(), "big")


def _resample(members: list[dict], target: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(selected with repeats, dropped) reaching `target` rows from `members`."""
    n = len(members)
    if target <= n:
        chosen = set(rng.sample(range(n), target))
        return [m for i, m in enumerate(members) if i in chosen], [m for i, m in enumerate(members) if i not in chosen]
    copies, remainder = divmod(target, n)
    extra = sorted(rng.sample(range(n), remainder))
    return members * copies + [members[i] for i in extra], []


def _targets(sizes: dict[str, int], config: MixConfig) -> dict[str, int]:
    """Rows each task's train split is resampled to: its ratio of the total, then its cap."""
    targets = dict(sizes)
    if config.ratios:
        listed = [task for task in config.ratios if sizes.get(task)]
        total = config.total if config.total is not None else sum(targets[t] for t in listed)
        weight = sum(config.ratios[t] for t in listed)
        for task in listed:
            targets[task] = _rounded(total * config.ratios[task] / weight)
    for task, cap in (config.caps or {}).items():
        if task in targets:
            targets[task] = min(targets[task], cap)
    return targets


def mix_train(train: list[dict], config: MixConfig) -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    """Mixed train rows (with repeats), rows dropped by downsampling, and per-task numbers: `mix_positions`
    on the records' positions, mapped back to the records."""
    names = sorted({record["task"] for record in train})
    code = {task: i for i, task in enumerate(names)}
    codes = np.array([code[record["task"]] for record in train], dtype=np.int32)
    mixed, dropped, stats = mix_positions(np.arange(len(train), dtype=np.int64), codes, names, config)
    return [train[p] for p in mixed.tolist()], [train[p] for p in dropped.tolist()], stats


def mix_positions(positions: np.ndarray, codes: np.ndarray, names: list[str], config: MixConfig) -> tuple[np.ndarray, np.ndarray, dict[str, dict[str, int]]]:
    """The mix of train rows given as positions (int64, in train order) with their task codes
    (`names[code]`): mixed order (with repeats), dropped rows and per-task numbers, in numpy arrays
    (8 bytes per row) rather than lists of Python objects (~60). Tasks are resampled to their
    targets in name order, each with its own seeded draw, then interleaved by `random.shuffle`'s
    permutation. `mix_train` is this on a list of records."""
    present = np.unique(codes)
    by_task = {names[code]: positions[codes == code] for code in present.tolist()}
    targets = _targets({task: len(members) for task, members in by_task.items()}, config)
    mixed, dropped, stats = [], [], {}
    for task in sorted(by_task):
        members = by_task[task]
        if targets[task] != len(members):  # only tasks the config resamples become lists
            chosen, removed = _resample(members.tolist(), targets[task], random.Random(_task_seed(config.seed, task)))
            selected, removed = np.array(chosen, dtype=np.int64), np.array(removed, dtype=np.int64)
        else:
            selected, removed = members, np.zeros(0, dtype=np.int64)
        mixed.append(selected)
        dropped.append(removed)
        stats[task] = {"before": len(members), "after": len(selected),
                       "upsampled_copies": max(0, len(selected) - len(members)), "downsampled": len(removed)}
    del by_task
    dropped_positions = np.concatenate(dropped) if dropped else np.zeros(0, dtype=np.int64)
    return _shuffled(mixed, config.seed), dropped_positions, stats


def _shuffled(parts: list[np.ndarray], seed: int) -> np.ndarray:
    """`random.Random(seed).shuffle` applied to the concatenated `parts`: the same permutation as
    on a list (its Fisher-Yates loop over the same draws), in an int64 array.array, not a list."""
    out = array("q")
    while parts:  # each part is copied in and let go: one copy of the rows at a time
        out.frombytes(np.ascontiguousarray(parts.pop(0), dtype=np.int64).view(np.uint8))
    randbelow = random.Random(seed)._randbelow  # what Random.shuffle draws each swap with
    for i in reversed(range(1, len(out))):
        j = randbelow(i + 1)
        out[i], out[j] = out[j], out[i]
    return np.frombuffer(out, dtype=np.int64)
