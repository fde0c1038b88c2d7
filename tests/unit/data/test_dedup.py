"""MinHash signatures and exact + near-duplicate detection, checked against exact 5-gram Jaccard of planted pairs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xxhash

from opt.data.dedup import DedupResult, _candidate_pairs, find_duplicates
from opt.data.jaccard import texts_source
from opt.data.minhash import MinHasher, recall_bands, tokenize
from tests.conftest import REPO, SAMPLE

THRESHOLD = 0.95
NGRAM = 5


def _words(text: str) -> list[str]:
    return [w.decode("utf-8") for w in tokenize(text)]


def _shingles(text: str) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i : i + NGRAM]) for i in range(len(w) - NGRAM + 1)} if len(w) >= NGRAM else {tuple(w)}


def jaccard(x: str, y: str) -> float:
    """Exact word 5-gram Jaccard under the same normalisation as MinHasher."""
    a, b = _shingles(x), _shingles(y)
    return len(a & b) / len(a | b)


def exact_hash(text: str) -> int:
    """The caller's exact-duplicate key: a hash of the normalised word sequence."""
    return xxhash.xxh3_64_intdigest(" ".join(_words(text)).encode("utf-8"))


def _windows(size: int) -> list[list[str]]:
    """Non-overlapping `size`-word windows of the bundled sample corpus (real English prose and code)."""
    out = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        w = _words(json.loads(line)["text"])
        out += [w[i : i + size] for i in range(0, len(w) - size + 1, size)]
    return out


@dataclass
class Corpus:
    texts: list[str]
    positives: list[tuple[int, int, float]]  # planted (i, j, exact Jaccard >= THRESHOLD)
    negatives: list[tuple[int, int, float]]  # planted (i, j, exact Jaccard < THRESHOLD)
    exact_groups: list[list[int]]  # indices of texts equal after normalisation


def _planted_corpus(seed: int = 0) -> Corpus:
    """300 distinct ~200-word documents plus near copies, dissimilar rewrites and exact copies, shuffled.

    One interior word changed in 200 words alters 5 of 196 shingles: J = 191/201 = 0.950, exactly at the threshold,
    where a 128-entry estimate is a coin flip. Positives therefore change 1-3 shingles (J 0.98-0.995) or one word
    in 400 (J = 391/401 = 0.975); negatives change 5% or 20% of the words (J ~0.6 and ~0.2). Every planted pair's
    label is its exact Jaccard, checked below, not the construction's intent.
    """
    rng = np.random.default_rng(seed)
    windows = _windows(200)
    picked = rng.choice(len(windows), size=360, replace=False)
    bases = [windows[i] for i in picked[:300]]
    bases[250:300] = [windows[picked[k]] + windows[picked[k + 60]] for k in range(250, 300)]  # 50 docs of 400 words
    fresh = iter(f"zq{k}" for k in range(10**6))  # words absent from the corpus

    def changed(words: list[str], positions: np.ndarray) -> list[str]:
        out = list(words)
        for p in positions:
            out[int(p)] = next(fresh)
        return out

    docs: list[tuple[str, int, str]] = [(" ".join(w), b, "base") for b, w in enumerate(bases)]
    for b in range(0, 60):  # change one of the last two words: 1-2 shingles differ
        docs.append((" ".join(changed(bases[b], rng.integers(198, 200, size=1))), b, "pos"))
    for b in range(60, 90):  # append 1-3 words
        docs.append((" ".join(bases[b] + [next(fresh) for _ in range(int(rng.integers(1, 4)))]), b, "pos"))
    for b in range(90, 110):  # drop the first word
        docs.append((" ".join(bases[b][1:]), b, "pos"))
    for b in range(250, 290):  # 400 words, one interior word changed
        docs.append((" ".join(changed(bases[b], rng.integers(10, 390, size=1))), b, "pos"))
    for b in range(110, 170):  # 20% of the words changed
        docs.append((" ".join(changed(bases[b], rng.choice(200, size=40, replace=False))), b, "neg"))
    for b in range(170, 200):  # 5% of the words changed
        docs.append((" ".join(changed(bases[b], rng.choice(200, size=10, replace=False))), b, "neg"))
    for b in range(200, 230):  # exact after normalisation: case, punctuation and spacing differ
        docs.append((" ".join(bases[b]).upper().replace(" ", ",  ", 3) + "!", b, "exact"))
        if b % 3 == 0:
            docs.append((" ".join(bases[b]) + " ", b, "exact"))

    order = rng.permutation(len(docs))  # copies often come before their original: lowest index must still win
    texts = [docs[k][0] for k in order]
    where: dict[tuple[int, str], list[int]] = {(docs[k][1], docs[k][2]): [] for k in order}
    for pos, k in enumerate(order):
        where[(docs[k][1], docs[k][2])].append(pos)
    positives: list[tuple[int, int, float]] = []
    negatives: list[tuple[int, int, float]] = []
    exact_groups: list[list[int]] = []
    for b in range(len(bases)):
        (i,) = where[(b, "base")]
        for j in where.get((b, "pos"), []) + where.get((b, "neg"), []):
            pair = (min(i, j), max(i, j), jaccard(texts[i], texts[j]))
            (positives if pair[2] >= THRESHOLD else negatives).append(pair)
        if (b, "exact") in where:
            exact_groups.append(sorted([i] + where[(b, "exact")]))
    return Corpus(texts, positives, negatives, exact_groups)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return _planted_corpus()


@pytest.fixture(scope="module")
def inputs(corpus: Corpus) -> tuple[np.ndarray, np.ndarray]:
    hashes = np.array([exact_hash(t) for t in corpus.texts], dtype=np.uint64)
    return hashes, MinHasher().signatures(corpus.texts)


def shingles(texts: list[str]):  # noqa: ANN201
    return texts_source(texts, MinHasher().shingle_hashes, batch=64)


@pytest.fixture(scope="module")
def result(corpus: Corpus, inputs: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> DedupResult:
    return find_duplicates(*inputs, threshold=THRESHOLD, work_dir=tmp_path_factory.mktemp("spill"), shingles=shingles(corpus.texts))


def _survivor(res: DedupResult, i: int) -> int:
    i = int(res.exact_of[i]) if res.exact_of[i] >= 0 else i
    return int(res.near_of[i]) if res.near_of[i] >= 0 else i


def test_planted_labels_are_what_the_construction_intends(corpus: Corpus) -> None:
    assert len(corpus.positives) == 150 and min(j for *_, j in corpus.positives) >= 0.97
    assert len(corpus.negatives) == 90 and max(j for *_, j in corpus.negatives) <= 0.8


def test_near_duplicate_recall_and_precision(corpus: Corpus, result: DedupResult) -> None:
    recalled = [p for p in corpus.positives if _survivor(result, p[0]) == _survivor(result, p[1])]
    recall = len(recalled) / len(corpus.positives)
    # Precision over every reported pair, planted or not, judged by the exact Jaccard of the pair reported.
    reported = np.flatnonzero(result.near_of >= 0)
    true = [jaccard(corpus.texts[i], corpus.texts[result.near_of[i]]) >= THRESHOLD for i in reported]
    precision = sum(true) / max(len(true), 1)
    assert recall == 1.0, recall
    assert precision == 1.0, precision
    assert not any(_survivor(result, i) == _survivor(result, j) for i, j, _ in corpus.negatives)
    # The reported similarity is the exact Jaccard (64-bit shingle hashes against the strings here), the estimate beside it.
    exact = np.array([jaccard(corpus.texts[i], corpus.texts[result.near_of[i]]) for i in reported])
    np.testing.assert_allclose(result.near_similarity[reported], exact, atol=1e-6)
    err = result.near_estimate[reported] - exact
    assert abs(float(np.mean(err))) < 0.02 and float(np.max(np.abs(err))) < 0.06
    stats = result.near_stats
    assert stats is not None and stats.decision == "exact_jaccard" and (stats.bands, stats.rows) == (10, 12)
    assert stats.candidate_pairs >= stats.checked >= stats.rejected >= 0 and stats.checked >= len(reported)


def test_lowest_index_survives_and_exact_points_to_it(corpus: Corpus, result: DedupResult) -> None:
    for group in corpus.exact_groups:
        assert result.exact_of[group[0]] == -1
        assert list(result.exact_of[group[1:]]) == [group[0]] * (len(group) - 1)
        assert (result.near_of[group[1:]] == -1).all()  # exact duplicates never enter the near pass
    assert result.exact_count == sum(len(g) - 1 for g in corpus.exact_groups)
    removed = np.flatnonzero(result.near_of >= 0)
    assert (result.near_of[removed] < removed).all() and result.keep[result.near_of[removed]].all()
    assert result.near_count == len(removed) and not result.keep[removed].any()
    assert result.keep.sum() == len(corpus.texts) - result.exact_count - result.near_count


def test_identical_for_partition_counts_and_memmap(
    corpus: Corpus, inputs: tuple[np.ndarray, np.ndarray], result: DedupResult, tmp_path: Path
) -> None:
    hashes, sigs = inputs
    mm_h = np.memmap(tmp_path / "hashes.u64", dtype=np.uint64, mode="w+", shape=hashes.shape)
    mm_s = np.memmap(tmp_path / "sigs.u32", dtype=np.uint32, mode="w+", shape=sigs.shape)
    mm_h[:], mm_s[:] = hashes, sigs
    mm_h.flush()
    mm_s.flush()
    mm_h = np.memmap(tmp_path / "hashes.u64", dtype=np.uint64, mode="r", shape=hashes.shape)
    mm_s = np.memmap(tmp_path / "sigs.u32", dtype=np.uint32, mode="r", shape=sigs.shape)
    for partitions, h, s in [(1, hashes, sigs), (16, hashes, sigs), (7, mm_h, mm_s)]:
        other = find_duplicates(h, s, THRESHOLD, tmp_path / "spill", partitions=partitions, shingles=shingles(corpus.texts))
        assert other.near_stats == result.near_stats
        for field in ("keep", "exact_of", "near_of", "near_similarity", "near_estimate"):
            np.testing.assert_array_equal(getattr(other, field), getattr(result, field), err_msg=f"{field} partitions={partitions}")
    assert list((tmp_path / "spill").iterdir()) == []  # spill files deleted


def test_clusters_merge_transitively_to_lowest_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, size=128, dtype=np.uint64).astype(np.uint32)
    sigs = rng.integers(0, 2**32, size=(6, 128), dtype=np.uint64).astype(np.uint32)
    sigs[1], sigs[3], sigs[4] = x, x, x
    sigs[1, :4] = 7  # 124/128 equal to x
    sigs[4, 100:104] = 9  # 124/128 equal to x, 120/128 equal to doc 1: joined through doc 3
    res = find_duplicates(np.arange(6, dtype=np.uint64), sigs, THRESHOLD, tmp_path)
    assert list(res.near_of) == [-1, -1, -1, 1, 1, -1]
    assert list(res.keep) == [True, True, True, False, False, True]
    np.testing.assert_allclose(res.near_similarity[[3, 4]], [124 / 128, 120 / 128])
    assert res.exact_count == 0 and res.near_count == 2


def test_large_identical_group_is_linear_not_quadratic(tmp_path: Path) -> None:
    n = 1000
    sigs = np.tile(np.arange(128, dtype=np.uint32), (n, 1))
    res = find_duplicates(np.arange(n, dtype=np.uint64) * 7919, sigs, work_dir=tmp_path)
    assert res.near_of[0] == -1 and (res.near_of[1:] == 0).all() and res.keep.sum() == 1
    a, b = _candidate_pairs(np.zeros(n, dtype=np.uint64), np.arange(n, dtype=np.int64))
    assert len(a) <= 2 * n and (a < b).all()


def test_empty_single_and_exact_only(tmp_path: Path) -> None:
    for n in (0, 1):
        res = find_duplicates(np.zeros(n, dtype=np.uint64), np.zeros((n, 128), dtype=np.uint32), work_dir=tmp_path)
        assert res.keep.tolist() == [True] * n and res.exact_count == res.near_count == 0
        assert res.exact_of.dtype == np.int64 and res.near_similarity.dtype == np.float32
    sigs = np.zeros((3, 128), dtype=np.uint32)
    res = find_duplicates(np.array([5, 6, 5], dtype=np.uint64), sigs, work_dir=tmp_path, near=False)
    assert res.exact_of.tolist() == [-1, -1, 0] and res.near_count == 0
    with pytest.raises(ValueError, match="signatures"):
        find_duplicates(np.zeros(3, dtype=np.uint64), np.zeros((2, 128), dtype=np.uint32), work_dir=tmp_path)


def test_signature_normalisation_and_edge_cases() -> None:
    mh = MinHasher()
    sig = mh.signature("Hello, World! the quick brown fox")
    assert sig.shape == (128,) and sig.dtype == np.uint32
    np.testing.assert_array_equal(sig, mh.signature("hello world\nTHE quick -- brown fox."))
    np.testing.assert_array_equal(mh.signature(""), np.full(128, 2**32 - 1, dtype=np.uint32))
    np.testing.assert_array_equal(mh.signature("?! ..."), mh.empty_signature)
    short, other = mh.signature("two words"), mh.signature("words two")  # < ngram words: one ordered shingle
    assert (short != mh.empty_signature).all() and not np.array_equal(short, other)
    texts = ["", "a b c d e f g", "naïve café “quoted” — Straße", "x"] * 3
    batch = mh.signatures(texts)
    assert batch.shape == (12, 128) and all(np.array_equal(batch[i], mh.signature(t)) for i, t in enumerate(texts))
    assert MinHasher(num_perm=64, seed=2).signatures(texts).shape == (12, 64)
    assert not np.array_equal(MinHasher(seed=2).signature("a b c d e f g"), batch[1])


def test_tokenize_matches_unicode_regex() -> None:
    for text in ["Straße “quoted”—dash naïve İstanbul", "ΟΔΟΣ ΚΑΙ", "a\u00a0b x_y 3.14", "日本語、です。", ""]:
        assert tokenize(text) == [w.encode("utf-8") for w in re.findall(r"\w+", text.lower())]


_SIG_SCRIPT = """
import sys, xxhash
from opt.data.minhash import MinHasher
texts = sys.stdin.buffer.read().decode("utf-8").split("\\x1e")
print(xxhash.xxh3_64_hexdigest(MinHasher().signatures(texts).tobytes()))
"""


def test_signatures_identical_across_processes_and_hash_seeds(corpus: Corpus) -> None:
    texts = corpus.texts[:50] + ["", "short text", "naïve café"]
    here = xxhash.xxh3_64_hexdigest(MinHasher().signatures(texts).tobytes())
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _SIG_SCRIPT],
            input="\x1e".join(texts).encode("utf-8"),
            env=env,
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        assert out.stdout.decode().strip() == here


def test_recall_bands_miss_at_most_one_in_a_thousand_at_the_threshold() -> None:
    assert recall_bands(0.95, 128) == (10, 12)
    for threshold, num_perm in [(0.95, 128), (0.9, 128), (0.8, 256), (0.5, 64)]:
        b, r = recall_bands(threshold, num_perm)
        assert b * r <= num_perm and (1 - threshold**r) ** b <= 1e-3
        # one more row would miss more than that: these are the fewest candidates at that recall
        assert r == num_perm or (1 - threshold ** (r + 1)) ** (num_perm // (r + 1)) > 1e-3
