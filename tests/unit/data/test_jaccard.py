"""The exact near-duplicate decision: pairs a few thousandths either side of the threshold, where a 128-entry
signature estimate is a coin flip, documents shorter than one shingle, and a shingle source that misbehaves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opt.data.dedup import find_duplicates
from opt.data.jaccard import ShingleStore, jaccard_sorted, texts_source
from opt.data.minhash import MinHasher

THRESHOLD = 0.95


def _near(texts: list[str], tmp_path: Path, **kw: object):  # noqa: ANN202
    """find_duplicates with the near pass only (every document its own exact key), decided exactly."""
    hasher = MinHasher()
    keys = np.arange(len(texts), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return find_duplicates(keys, hasher.signatures(texts), THRESHOLD, tmp_path, shingles=texts_source(texts, hasher.shingle_hashes), **kw)


def _base(k: int, words: int) -> list[str]:
    return [f"w{k}x{i}" for i in range(words)]


def test_pairs_either_side_of_the_threshold_are_decided_by_their_exact_jaccard(tmp_path: Path) -> None:
    # A document of 200 distinct words has 196 shingles; appending t fresh words adds t: J = 196 / (196 + t).
    # t = 10 -> 0.9515 (a copy), t = 11 -> 0.9469 (not). 194 words + 10 -> 190/200 = 0.95 exactly (a copy).
    texts, above, below = [], [], []
    for k in range(40):
        words = 194 if k % 4 == 0 else 200
        extra = 10 if k % 2 == 0 else 11
        base = _base(k, words)
        texts += [" ".join(base), " ".join(base + [f"t{k}y{i}" for i in range(extra)])]
        (above if extra == 10 else below).append((2 * k, 2 * k + 1, (words - 4) / (words - 4 + extra)))
    res = _near(texts, tmp_path)
    assert min(j for *_, j in above) == 0.95 and max(j for *_, j in below) < 0.947
    for a, b, j in above:
        assert res.near_of[b] == a and res.near_similarity[b] == pytest.approx(j, abs=1e-6), (a, b, j)
    for a, b, j in below:
        assert res.near_of[b] == -1 and res.keep[b], (a, b, j)
    # The estimate alone gets some of these wrong; that is why the exact decision exists.
    hasher = MinHasher()
    estimate = find_duplicates(np.arange(len(texts), dtype=np.uint64) * 7919, hasher.signatures(texts), THRESHOLD, tmp_path)
    wrong = sum(estimate.near_of[b] != a for a, b, _ in above) + sum(estimate.near_of[b] >= 0 for _, b, _ in below)
    assert wrong > 0
    stats = res.near_stats
    assert stats is not None and stats.rejected >= len(below) and stats.checked - stats.rejected == len(above)
    assert stats.candidate_docs == len(texts)


def test_documents_shorter_than_one_shingle(tmp_path: Path) -> None:
    texts = [
        "two words",  # 0: one shingle, the whole word sequence
        "Two, WORDS!",  # 1: the same words: Jaccard 1 (the exact pass is off here), a near copy of 0
        "words two",  # 2: another order, another shingle: Jaccard 0 with 0
        "a b c d",  # 3: four words, one shingle
        "a b c d e",  # 4: five words: one 5-gram, not the 4-word shingle of 3
        "!!! ...",  # 5: no words, no shingles
        "??? ---",  # 6: no words either: two empty sets are equal
        "a b c d",  # 7: the same as 3
    ]
    res = _near(texts, tmp_path)
    assert res.near_of.tolist() == [-1, 0, -1, -1, -1, -1, 5, 3]
    assert res.near_similarity[[1, 6, 7]].tolist() == [1.0, 1.0, 1.0]


def test_sizes_alone_reject_without_reading(tmp_path: Path) -> None:
    a = np.arange(100, dtype=np.uint64)

    def source(docs: np.ndarray):  # noqa: ANN202
        yield from zip(docs.tolist(), [a, a[:94], a[:96], np.empty(0, np.uint64)], strict=True)

    store = ShingleStore(tmp_path / "s.u64", np.array([0, 1, 2, 3]), source)
    try:
        j = store.jaccard(np.array([0, 0, 0]), np.array([1, 2, 3]), THRESHOLD)
        assert j.tolist() == [0.94, 0.96, 0.0]  # 94/100 is a size bound, 96/100 the real intersection
        assert store.get(2).tolist() == list(range(96))
        with pytest.raises(KeyError, match="not a candidate"):
            store.get(7)
    finally:
        store.close()
    assert not (tmp_path / "s.u64").exists()


def test_jaccard_sorted() -> None:
    x, y = np.array([1, 3, 5, 7], dtype=np.uint64), np.array([3, 4, 5, 9, 11], dtype=np.uint64)
    assert jaccard_sorted(x, y) == jaccard_sorted(y, x) == 2 / 7
    assert jaccard_sorted(x, x) == 1.0
    empty = np.empty(0, dtype=np.uint64)
    assert jaccard_sorted(empty, empty) == 1.0 and jaccard_sorted(empty, x) == 0.0
    assert jaccard_sorted(np.array([99], dtype=np.uint64), x) == 0.0  # beyond every element of the other set


def test_a_shingle_source_that_skips_a_document_is_refused(tmp_path: Path) -> None:
    def skipping(docs: np.ndarray):  # noqa: ANN202
        for d in docs[1:]:
            yield int(d), np.zeros(1, dtype=np.uint64)

    with pytest.raises(ValueError, match="yielded document 3 where 1 was expected"):
        ShingleStore(tmp_path / "s.u64", np.array([1, 3]), skipping)

    def short(docs: np.ndarray):  # noqa: ANN202
        yield int(docs[0]), np.zeros(1, dtype=np.uint64)

    with pytest.raises(ValueError, match="yielded 1 of 2 documents"):
        ShingleStore(tmp_path / "t.u64", np.array([1, 3]), short)
    texts = ["same words in both of these documents here"] * 2
    hasher = MinHasher()
    with pytest.raises(ValueError, match="shingle source"):
        find_duplicates(np.array([1, 2], dtype=np.uint64), hasher.signatures(texts), THRESHOLD, tmp_path, shingles=short)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("dedup-")] == []  # spill removed on error


def test_shingle_hashes_are_the_sets_the_signatures_are_taken_over() -> None:
    hasher = MinHasher()
    texts = ["a b c d e a b c d e a b c d e f", "two words", "", "Naïve café, “quoted” text and more words here"] * 3
    sets = hasher.shingle_hashes(texts)
    assert [len(s) for s in sets[:4]] == [6, 1, 0, 4]  # 12 windows of 5 words, 6 distinct; 1; 0; 8 words - 4
    for text, hashes, sig in zip(texts, sets, hasher.signatures(texts), strict=True):
        assert hashes.dtype == np.uint64 and (np.diff(hashes.astype(np.float64)) > 0).all()
        np.testing.assert_array_equal(hashes, hasher.shingle_hashes([text])[0])  # batching does not change a set
        if len(hashes):  # the signature is the per-permutation minimum over the top 32 bits of exactly these hashes
            keys = hashes >> np.uint64(32)
            expect = ((hasher._a * keys[None, :] + hasher._b) >> np.uint64(32)).min(axis=1)
            np.testing.assert_array_equal(sig, expect.astype(np.uint32))
        else:
            np.testing.assert_array_equal(sig, hasher.empty_signature)
