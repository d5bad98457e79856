"""Exact and near-duplicate detection; contamination of train by validation/test prompts.

Near duplicates use rensa's batch APIs so no Python object is built per record:

1. words of every text are hashed by `RMinHash.hash_token_sets` (Rust); word n-gram hashes
   are combined from them with numpy (one vectorised pass over a flat array);
2. `RMinHash.digest_matrix_from_flat_token_hashes` builds all MinHash signatures at once;
3. `RMinHashLSH.query_duplicate_flags_matrix_one_shot` flags every row that shares an LSH band
   with another row — usually a small fraction;
4. only the flagged rows get their signatures copied out; candidate pairs are the rows sharing
   a band (the same banding as rensa's); a pair counts when its Jaccard on the shingle sets
   reaches the threshold (the signature estimate pre-filters, the exact sets decide).

A record is a near-duplicate when it is similar to any *earlier* record (source order), so the
first record of a group is kept.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import BinaryIO, Sequence

import numpy as np
from rensa import RMinHash, RMinHashLSH
from tunepipe.schemas.data import DedupConfig

_CHUNK = 50_000  # texts hashed per rensa call: bounds the Python lists alive at once
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)
_PAIR_BATCH = 200_000  # signature pairs compared per numpy step (memory: batch x num_perm bytes)
PARTITION_ROWS = 1 << 20  # 8-byte keys sorted together by `repeated_rows` (~32 MiB)


def exact_key(family: str, parts: Sequence[str], collapsed: bool = True) -> bytes:
    """Key of normalised content: case-folded, whitespace-collapsed, task-independent.

    `collapsed`: the cleaner already collapsed whitespace, so splitting again is skipped.
    """
    text = "\x1e".join(parts if collapsed else (" ".join(p.split()) for p in parts))
    return hashlib.blake2b(f"{family}\x1f{text}".lower().encode(), digest_size=12).digest()


def bands_of(config: DedupConfig) -> int:
    """The LSH bands a dedup config uses: its own `num_bands`, or the optimal count for its threshold."""
    return config.num_bands or optimal_bands(config.threshold, config.num_perm)


def optimal_bands(threshold: float, num_perm: int) -> int:
    """Bands b (dividing num_perm) minimising the LSH false-positive + false-negative areas.

    datasketch's `_optimal_param` criterion, restricted to divisors (rensa's bands split the
    signature evenly) and weighted 0.1/0.9 towards recall: every candidate pair is verified on
    its signatures afterwards, so a false positive costs a comparison, a false negative a
    duplicate left in the data.
    """
    grid = np.linspace(0.0, 1.0, 1001)
    best, best_error = 1, float("inf")
    for bands in range(1, num_perm + 1):
        if num_perm % bands:
            continue
        rows = num_perm // bands
        prob = 1.0 - (1.0 - grid**rows) ** bands
        low, high = grid <= threshold, grid >= threshold
        false_pos = np.trapezoid(prob[low], grid[low])
        false_neg = np.trapezoid(1.0 - prob[high], grid[high])
        error = 0.1 * false_pos + 0.9 * false_neg
        if error < best_error:
            best, best_error = bands, error
    return best


def shingle_hashes(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat u64 word n-gram hashes of `texts` and their row offsets (len(texts) + 1).

    Texts with fewer words than `ngram` get one shingle of all their words; a text with no
    words gets one constant shingle (callers leave empty texts out).
    """
    flats, counts = [], []
    for start in range(0, len(texts), _CHUNK):
        words = [t.lower().split() for t in texts[start:start + _CHUNK]]
        hashed = RMinHash.hash_token_sets(words)
        lengths = np.fromiter(map(len, hashed), dtype=np.int64, count=len(hashed))
        flat = np.fromiter(itertools.chain.from_iterable(hashed), dtype=np.uint64, count=int(lengths.sum()))
        del words, hashed
        grams, per_doc = _ngrams(flat, lengths, ngram)
        flats.append(grams)
        counts.append(per_doc)
    flat = np.concatenate(flats) if flats else np.zeros(0, dtype=np.uint64)
    per_doc = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(per_doc) + 1, dtype=np.uint64)
    np.cumsum(per_doc, out=offsets[1:])
    return flat, offsets


def _ngrams(word_hashes: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n-gram hashes per document from the flat word hashes (vectorised)."""
    starts = np.cumsum(lengths) - lengths
    per_doc = np.maximum(lengths - n + 1, 1)  # short docs: one shingle of what they have
    total = int(per_doc.sum())
    doc_of = np.repeat(np.arange(len(lengths)), per_doc)
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    pos = np.arange(total) - first + starts[doc_of]  # index of the n-gram's first word
    limit = starts[doc_of] + lengths[doc_of]  # one past the doc's last word
    padded = np.concatenate([word_hashes, np.zeros(n, dtype=np.uint64)])
    with np.errstate(over="ignore"):
        acc = np.zeros(total, dtype=np.uint64)
        for k in range(n):
            idx = pos + k
            value = np.where(idx < limit, padded[np.minimum(idx, len(padded) - 1)], np.uint64(0))
            acc = (acc * _K1) ^ (value + np.uint64(k + 1)) * _K2
        # splitmix64 finaliser: spreads the combined bits so MinHash sees uniform hashes
        acc ^= acc >> np.uint64(30)
        acc *= np.uint64(0xBF58476D1CE4E5B9)
        acc ^= acc >> np.uint64(27)
        acc *= np.uint64(0x94D049BB133111EB)
        acc ^= acc >> np.uint64(31)
    return acc, per_doc


class SignatureIndex:
    """MinHash signatures of a list of texts, with LSH candidate search through rensa."""

    def __init__(self, texts: Sequence[str], config: DedupConfig) -> None:
        self.config = config
        self.num_bands = bands_of(config)
        self.flat, self.offsets = shingle_hashes(texts, config.ngram)
        self.matrix = RMinHash.digest_matrix_from_flat_token_hashes(self.flat, self.offsets, config.num_perm, config.seed)
        lsh = RMinHashLSH(config.threshold, config.num_perm, self.num_bands)
        self.flags = np.asarray(lsh.query_duplicate_flags_matrix_one_shot(self.matrix), dtype=bool)
        self.matrix = None  # the full matrix is no longer needed: free it before the subset work

    def flagged_signatures(self) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, signatures) of the rows that share a band with some other row."""
        rows = np.flatnonzero(self.flags)
        if len(rows) == 0:
            return rows, np.zeros((0, self.config.num_perm), dtype=np.uint32)
        starts, ends = self.offsets[rows].astype(np.int64), self.offsets[rows + 1].astype(np.int64)
        lengths = ends - starts
        take = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
        sub_flat = self.flat[take]
        sub_offsets = np.zeros(len(rows) + 1, dtype=np.uint64)
        np.cumsum(lengths, out=sub_offsets[1:])
        sub = RMinHash.digest_matrix_from_flat_token_hashes(sub_flat, sub_offsets, self.config.num_perm, self.config.seed)
        signatures = np.asarray(sub.to_rows(), dtype=np.uint32)
        return rows, signatures

    def candidate_pairs(self, signatures: np.ndarray, order_key: np.ndarray | None = None) -> np.ndarray:
        """Pairs (i, j) of positions in `signatures` that share at least one LSH band.

        In each band bucket, every member is paired with the bucket's first member (by
        `order_key`, default position) and with its predecessor: enough to connect groups
        without the quadratic blow-up of all pairs in a large bucket.
        """
        m = len(signatures)
        if m < 2:
            return np.zeros((0, 2), dtype=np.int64)
        key = np.arange(m) if order_key is None else order_key
        pairs = []
        for block in band_blocks(signatures, self.num_bands):
            labels = np.unique(block, return_inverse=True)[1].ravel()
            pairs.append(bucket_pairs(labels, key))
        return np.unique(np.concatenate(pairs), axis=0)


    def similar(self, signatures: np.ndarray, pairs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Boolean mask of pairs whose Jaccard on word n-grams is at least the threshold.

        The MinHash estimate only pre-filters (pairs more than 0.15 below the threshold, over
        4 standard deviations at 128 permutations, are dropped); the survivors are checked on
        their exact shingle sets, so pairs just above the threshold are not lost to the
        estimate's noise and pairs just below it are not let in.
        """
        keep = np.zeros(len(pairs), dtype=bool)
        floor = self.config.threshold - 0.15
        for start in range(0, len(pairs), _PAIR_BATCH):
            chunk = pairs[start:start + _PAIR_BATCH]
            estimate = (signatures[chunk[:, 0]] == signatures[chunk[:, 1]]).mean(axis=1)
            keep[start:start + len(chunk)] = estimate >= floor
        flat, offsets, threshold = self.flat, self.offsets, self.config.threshold
        shingle_sets: dict[int, set] = {}

        def shingles(row: int) -> set:
            found = shingle_sets.get(row)
            if found is None:
                found = shingle_sets[row] = set(flat[int(offsets[row]):int(offsets[row + 1])].tolist())
            return found

        for position in np.flatnonzero(keep).tolist():
            a, b = shingles(int(rows[pairs[position, 0]])), shingles(int(rows[pairs[position, 1]]))
            keep[position] = len(a & b) >= threshold * len(a | b)
        return keep


def band_blocks(signatures: np.ndarray, num_bands: int) -> list[np.ndarray]:
    """Per band, one opaque value per row holding that band's slice of the signature."""
    rows_per_band = signatures.shape[1] // num_bands
    blocks = []
    for band in range(num_bands):
        block = np.ascontiguousarray(signatures[:, band * rows_per_band:(band + 1) * rows_per_band])
        blocks.append(block.view(np.dtype((np.void, block.dtype.itemsize * rows_per_band))).ravel())
    return blocks


def bucket_pairs(labels: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Candidate pairs (positions) of rows with the same bucket label.

    In each bucket, every member is paired with the bucket's first member (by `key`) and with
    its predecessor: both engines call this, the `ray` one per shuffle partition of band keys.
    """
    m = len(labels)
    order = np.lexsort((key, labels))
    sorted_labels = labels[order]
    same_as_prev = np.concatenate([[False], sorted_labels[1:] == sorted_labels[:-1]])
    if not same_as_prev.any():
        return np.zeros((0, 2), dtype=np.int64)
    group_start = np.maximum.accumulate(np.where(same_as_prev, 0, np.arange(m)))
    members = np.flatnonzero(same_as_prev)
    return np.concatenate([
        np.stack([order[group_start[members]], order[members]], axis=1),
        np.stack([order[members - 1], order[members]], axis=1),
    ])


def repeated_rows(keys: BinaryIO, rows: int) -> np.ndarray:
    """Rows (ascending) whose key another row has, of a file of `rows` uint64 keys (one per row).

    Equal keys fall in the same range of key values, so the file is read once per range of about
    `PARTITION_ROWS` rows (the keys are hashes: uniform) and each range's keys are sorted alone.
    Memory is ~32 bytes per row of one range plus the rows found, not per row of the file, so the
    streaming engine's band pass and the validation's id uniqueness stay bounded at any size.
    """
    parts = -(-rows // PARTITION_ROWS)
    found = [np.zeros(0, dtype=np.int64)]
    for part in range(parts):
        keys.seek(0)
        values, positions = [], []
        for start in range(0, rows, PARTITION_ROWS):
            chunk = np.frombuffer(keys.read(8 * min(PARTITION_ROWS, rows - start)), dtype=np.uint64)
            mine = np.flatnonzero(_key_range(chunk, parts) == part)
            values.append(chunk[mine])
            positions.append(mine + start)
        found.append(_repeated(np.concatenate(values), np.concatenate(positions)))
    return np.sort(np.concatenate(found))


def _key_range(keys: np.ndarray, parts: int) -> np.ndarray:
    """Which of `parts` equal ranges of uint64 values each key falls in (its top 32 bits, scaled)."""
    return ((keys >> np.uint64(32)) * np.uint64(parts)) >> np.uint64(32)


def _repeated(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """`positions` whose key another position has: a sort and a neighbour test."""
    order = np.argsort(keys)  # the order among equal keys does not matter
    ordered = keys[order]
    same = ordered[1:] == ordered[:-1]
    del ordered
    shared = np.zeros(len(order), dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    return positions[order[shared]]


def signatures(texts: Sequence[str], config: DedupConfig) -> np.ndarray:
    """MinHash signatures (rows × num_perm, uint32) of `texts`: each row depends on its text only,
    so a worker computing a slice gets the rows the whole list would have."""
    flat, offsets = shingle_hashes(texts, config.ngram)
    matrix = RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, config.num_perm, config.seed)
    return np.asarray(matrix.to_rows(), dtype=np.uint32).reshape(len(texts), config.num_perm)


def verify_pairs(texts: Sequence[str], pairs: np.ndarray, config: DedupConfig) -> np.ndarray:
    """Mask of candidate `pairs` (positions in `texts`) that are similar, by the same test as the
    local engine (`SignatureIndex.similar`): for the `ray` engine's candidates, gathered on the driver."""
    index = SignatureIndex.__new__(SignatureIndex)
    index.config = config
    index.flat, index.offsets = shingle_hashes(texts, config.ngram)
    return index.similar(signatures(texts, config), pairs, np.arange(len(texts)))


def near_duplicates(texts: Sequence[str], config: DedupConfig) -> dict[int, int]:
    """Index of each near-duplicate text → index of an earlier text it is similar to."""
    if len(texts) < 2:
        return {}
    index = SignatureIndex(texts, config)
    rows, signatures = index.flagged_signatures()
    pairs = index.candidate_pairs(signatures)
    if len(pairs) == 0:
        return {}
    pairs = pairs[index.similar(signatures, pairs, rows)]
    first, second = rows[pairs[:, 0]], rows[pairs[:, 1]]
    earlier, later = np.minimum(first, second), np.maximum(first, second)
    duplicate_of: dict[int, int] = {}
    for keep, drop in sorted(zip(earlier.tolist(), later.tolist())):
        duplicate_of.setdefault(drop, keep)
    return duplicate_of


def contaminated(train_texts: Sequence[str], eval_texts: Sequence[str], config: DedupConfig) -> dict[int, int]:
    """Index of each train text similar to some eval text → index of that eval text."""
    if not train_texts or not eval_texts:
        return {}
    n_eval = len(eval_texts)
    index = SignatureIndex(list(eval_texts) + list(train_texts), config)
    rows, signatures = index.flagged_signatures()
    # Eval rows sort first within a bucket, so each train row is paired with an eval row.
    is_train = (rows >= n_eval).astype(np.int64)
    pairs = index.candidate_pairs(signatures, order_key=is_train * (len(rows) + 1) + np.arange(len(rows)))
    if len(pairs) == 0:
        return {}
    a, b = rows[pairs[:, 0]], rows[pairs[:, 1]]
    cross = (a < n_eval) != (b < n_eval)
    pairs, a, b = pairs[cross], a[cross], b[cross]
    ok = index.similar(signatures, pairs, rows)
    result: dict[int, int] = {}
    for x, y in zip(a[ok].tolist(), b[ok].tolist()):
        eval_row, train_row = (x, y) if x < n_eval else (y, x)
        result.setdefault(train_row - n_eval, eval_row)
    return result
