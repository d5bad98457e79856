"""Exact keys, near-duplicates with rensa, contamination."""

from __future__ import annotations

import random

import numpy as np

from tunepipe.schemas.data import DedupConfig
from tunepipe.tasks.data.dedup import contaminated, exact_key, near_duplicates, optimal_bands, shingle_hashes


def corpus(n: int, seed: int = 0, words: tuple[int, int] = (25, 40)) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    return [" ".join(rng.choices(vocab, k=rng.randint(*words))) for _ in range(n)]


def jaccard(a: str, b: str, n: int = 3) -> float:
    def grams(text):
        words = text.lower().split()
        return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}

    sa, sb = grams(a), grams(b)
    return len(sa & sb) / len(sa | sb)


def test_exact_key_normalises_case_and_space_not_task():
    assert exact_key("sft", ["Hello World", "x"]) == exact_key("sft", ["hello world", "X"])
    assert exact_key("sft", ["a  b"], collapsed=False) == exact_key("sft", ["a b"])
    assert exact_key("sft", ["a", "b"]) != exact_key("sft", ["a b"]) != exact_key("text", ["a b"])


def test_optimal_bands_divide_and_favour_recall():
    assert optimal_bands(0.8, 128) == 16
    assert 1 - (1 - 0.8**8) ** 16 > 0.9  # a pair at the threshold is very likely a candidate
    for threshold in (0.5, 0.7, 0.9):
        assert 128 % optimal_bands(threshold, 128) == 0


def test_shingles_are_deterministic_and_cover_short_texts():
    flat, offsets = shingle_hashes(["a b c d", "a b", "", "A B C D"], 3)
    assert offsets.tolist() == [0, 2, 3, 4, 6]
    assert flat[0:2].tolist() == flat[4:6].tolist()  # case-insensitive
    again, _ = shingle_hashes(["a b c d"], 3)
    assert again.tolist() == flat[0:2].tolist()


def test_near_duplicates_recall_and_precision():
    rng = random.Random(1)
    texts = corpus(3000, words=(30, 80))
    truth = {}
    for original in rng.sample(range(3000), 300):
        words = texts[original].split()
        words[rng.randrange(len(words))] = "changed"
        texts.append(" ".join(words))
        truth[len(texts) - 1] = original
    found = near_duplicates(texts, DedupConfig())
    assert set(found) <= set(truth)  # precision: every flag is planted
    similarity = {later: jaccard(texts[later], texts[earlier]) for later, earlier in truth.items()}
    clear = [later for later, j in similarity.items() if j >= 0.85]
    assert len(clear) > 100
    assert sum(1 for later in clear if found.get(later) == truth[later]) / len(clear) >= 0.95
    assert not [later for later in found if similarity[later] < 0.7]
    assert all(earlier < later for later, earlier in found.items())  # the first copy is kept


def test_near_duplicates_respect_the_threshold():
    base = corpus(1)[0].split()
    far = list(base)
    for i in range(0, len(far), 3):
        far[i] = f"x{i}"  # every third word changed: Jaccard on 3-grams ~0
    assert near_duplicates([" ".join(base), " ".join(far)], DedupConfig()) == {}
    assert near_duplicates([" ".join(base), " ".join(base).upper()], DedupConfig()) == {1: 0}


def test_contamination_pairs_train_with_eval():
    texts = corpus(200)
    train = texts[:100] + [texts[150] + " please"]
    evaluation = texts[150:]
    hits = contaminated(train, evaluation, DedupConfig())
    assert hits == {100: 0}
    assert contaminated(train, [], DedupConfig()) == {}


def test_signature_rows_match_rensa_objects():
    from rensa import RMinHash

    from tunepipe.tasks.data.dedup import SignatureIndex

    texts = corpus(50) + corpus(1)  # two identical texts so at least one row is flagged
    texts.append(texts[0])
    index = SignatureIndex(texts, DedupConfig())
    rows, signatures = index.flagged_signatures()
    assert 0 in rows.tolist() and len(texts) - 1 in rows.tolist()
    flat, offsets = shingle_hashes([texts[0]], 3)
    single = RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, 128, 42).to_rows()[0]
    assert np.array_equal(signatures[rows.tolist().index(0)], np.asarray(single, dtype=np.uint32))
