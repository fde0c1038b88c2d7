"""Near-duplicate detection: ours (MinHasher + find_duplicates) against datasketch (MinHash + MinHashLSH).

Builds a synthetic corpus (default ~20 MB) by recombining paragraphs of the bundled sample corpus, plants near
copies of a few % of the documents with a spread of edits, and labels every planted pair with its exact word
5-gram Jaccard. Both systems run in this one process and thread on the same corpus and the same shingles, and
both apply the same rule: candidates verified by estimated Jaccard >= threshold, clusters by union-find, the
lowest index survives. Recall is over planted pairs with exact Jaccard >= threshold (same surviving document);
precision is over every reported (document, survivor) pair, judged by its exact Jaccard.

Prints one JSON line per system and a final summary line. `python bench/near_dup.py --mb 20`
"""

from __future__ import annotations

import os

# Single thread for both systems (numpy's BLAS is barely used, but make it explicit before numpy loads).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import xxhash  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opt.data.dedup import DEDUP_LSH_WEIGHTS, find_duplicates  # noqa: E402
from opt.data.minhash import MinHasher  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "python-docs.jsonl"
WORD = re.compile(r"\w+")  # the normalisation both systems shingle: lowercase, split on non-word characters
NGRAM = 5
NUM_PERM = 128


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def shingle_set(text: str) -> set[str]:
    w = words(text)
    return {" ".join(w[i : i + NGRAM]) for i in range(len(w) - NGRAM + 1)} if len(w) >= NGRAM else {" ".join(w)}


def exact_jaccard(x: str, y: str) -> float:
    a, b = shingle_set(x), shingle_set(y)
    return len(a & b) / max(len(a | b), 1)


@dataclass
class Corpus:
    texts: list[str]
    planted: list[tuple[int, int, float]]  # (original, copy, exact Jaccard), in corpus order indices
    mb: float


def build_corpus(target_mb: float, near_fraction: float, seed: int) -> Corpus:
    """Documents of 2-60 random sample paragraphs (~3 KB median); near copies aiming at Jaccard uniform in [0.9, 1)."""
    rng = np.random.default_rng(seed)
    paragraphs = sorted({p.strip() for line in SAMPLE.open(encoding="utf-8") for p in re.split(r"\n\s*\n", json.loads(line)["text"])})
    paragraphs = [p for p in paragraphs if len(p.split()) >= 5]
    docs: list[str] = []
    size = 0
    while size < target_mb * 1e6 * (1 - near_fraction):
        k = int(np.clip(rng.lognormal(np.log(16), 0.6), 2, 60))
        doc = "\n\n".join(paragraphs[i] for i in rng.integers(0, len(paragraphs), size=k))
        docs.append(doc)
        size += len(doc.encode("utf-8"))

    copies: list[tuple[int, str]] = []
    for src in rng.choice(len(docs), size=max(1, int(len(docs) * near_fraction)), replace=False):
        tokens = docs[src].split()  # whitespace tokens, rejoined with single spaces (normalisation ignores layout)
        target = rng.uniform(0.9, 1.0)
        if rng.random() < 0.7:  # substitute k words: J ~ (S - 5k) / (S + 5k) for S shingles
            k = max(1, round(len(tokens) * (1 - target) / (5 * (1 + target))))
            for p in rng.choice(len(tokens), size=min(k, len(tokens)), replace=False):
                tokens[p] = f"edit{rng.integers(1 << 30)}"
        else:  # append a boilerplate tail of fresh words: J ~ S / (S + added)
            tokens += [f"tail{rng.integers(1 << 30)}" for _ in range(max(1, round(len(tokens) * (1 - target))))]
        copies.append((int(src), " ".join(tokens)))

    # Shuffle everything together: a copy may come before its original.
    texts = docs + [t for _, t in copies]
    order = rng.permutation(len(texts))
    position = np.empty(len(texts), dtype=np.int64)
    position[order] = np.arange(len(texts))
    shuffled = [texts[i] for i in order]
    planted = []
    for c, (src, text) in enumerate(copies):
        a, b = int(position[src]), int(position[len(docs) + c])
        planted.append((min(a, b), max(a, b), exact_jaccard(docs[src], text)))
    return Corpus(shuffled, planted, sum(len(t.encode("utf-8")) for t in shuffled) / 1e6)


def evaluate(corpus: Corpus, near_of: np.ndarray, threshold: float) -> dict:
    """Recall over planted pairs with exact J >= threshold; precision over all reported (doc, survivor) pairs.

    A 128-entry estimate of J has a standard deviation of ~0.02 near 0.95, so pairs within a few hundredths of the
    threshold fall on either side by chance: `recall_j97` (pairs with J >= 0.97) and `fp_min_exact_j` (how far
    below the threshold the false positives are) separate that from real misses.
    """
    survivor = np.where(near_of >= 0, near_of, np.arange(len(near_of)))
    positives = [(a, b, j) for a, b, j in corpus.planted if j >= threshold]
    hit = [bool(survivor[a] == survivor[b]) for a, b, _ in positives]
    clear = [h for h, (_, _, j) in zip(hit, positives, strict=True) if j >= 0.97]
    reported = np.flatnonzero(near_of >= 0)
    exact = [exact_jaccard(corpus.texts[i], corpus.texts[near_of[i]]) for i in reported]
    false = [j for j in exact if j < threshold]
    return {
        "recall": round(sum(hit) / max(len(hit), 1), 4),
        "precision": round((len(exact) - len(false)) / max(len(exact), 1), 4),
        "reported": int(len(reported)),
        "recall_j97": round(sum(clear) / max(len(clear), 1), 4),
        "fp_min_exact_j": round(min(false), 4) if false else None,
    }


def rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(texts: Sequence[str], threshold: float, work_dir: Path) -> tuple[np.ndarray, dict]:
    t0 = time.perf_counter()
    # The caller's exact key (normalised text hash); part of our pipeline, so it is timed.
    hashes = np.fromiter((xxhash.xxh3_64_intdigest(" ".join(t.lower().split()).encode("utf-8")) for t in texts), np.uint64, len(texts))
    t1 = time.perf_counter()
    sigs = MinHasher(num_perm=NUM_PERM, ngram=NGRAM).signatures(texts)
    t2 = time.perf_counter()
    res = find_duplicates(hashes, sigs, threshold, work_dir)
    t3 = time.perf_counter()
    # Planted copies are never exact duplicates; fold exact ones in anyway so both systems are judged alike.
    near_of = np.where(res.exact_of >= 0, res.exact_of, res.near_of)
    return near_of, {"exact_hash_s": round(t1 - t0, 3), "signature_s": round(t2 - t1, 3), "dedup_s": round(t3 - t2, 3), "seconds": t3 - t0}


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the lowest index is the root, as in ours


def datasketch_minhashes(texts: Sequence[str]) -> tuple[list, float]:
    """datasketch MinHash per document over the same 5-gram shingles (utf-8), via MinHash.generator (shared perms)."""
    from datasketch import MinHash

    t0 = time.perf_counter()

    def shingles() -> Iterator[list[bytes]]:
        for text in texts:
            w = words(text)
            if len(w) >= NGRAM:
                yield [" ".join(w[i : i + NGRAM]).encode("utf-8") for i in range(len(w) - NGRAM + 1)]
            else:
                yield [" ".join(w).encode("utf-8")] if w else []

    mhs = list(MinHash.generator(shingles(), num_perm=NUM_PERM))
    return mhs, time.perf_counter() - t0


def datasketch_lsh(minhashes: list, threshold: float, weights: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """MinHashLSH insert + query, candidates verified by MinHash.jaccard, clustered to the lowest index."""
    from datasketch import MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=weights)
    for i, m in enumerate(minhashes):
        lsh.insert(i, m, check_duplication=False)
    uf = _UnionFind(len(minhashes))
    candidates = 0
    for i, m in enumerate(minhashes):
        for j in lsh.query(m):
            if j < i:
                candidates += 1
                if m.jaccard(minhashes[j]) >= threshold:
                    uf.union(i, j)
    roots = np.array([uf.find(i) for i in range(len(minhashes))], dtype=np.int64)
    near_of = np.where(roots != np.arange(len(roots)), roots, -1)
    return near_of, {"lsh_s": round(time.perf_counter() - t0, 3), "bands": lsh.b, "rows": lsh.r, "candidate_pairs": candidates}


def line(system: str, corpus: Corpus, seconds: float, near_of: np.ndarray, threshold: float, extra: dict) -> dict:
    out = {
        "system": system,
        "docs": len(corpus.texts),
        "mb": round(corpus.mb, 2),
        "seconds": round(seconds, 3),
        "docs_s": round(len(corpus.texts) / seconds, 1),
        "mb_s": round(corpus.mb / seconds, 3),
        **evaluate(corpus, near_of, threshold),
        "peak_rss_mb": round(rss_mb(), 1),
        **extra,
    }
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of UTF-8 text")
    ap.add_argument("--near-fraction", type=float, default=0.04, help="fraction of documents given a planted near copy")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", type=Path, default=None, help="spill directory for ours (default: system temp)")
    args = ap.parse_args()

    corpus = build_corpus(args.mb, args.near_fraction, args.seed)
    planted_j = np.array([j for *_, j in corpus.planted])
    positives = int((planted_j >= args.threshold).sum())
    print(
        json.dumps(
            {
                "corpus": "sample paragraphs recombined",
                "docs": len(corpus.texts),
                "mb": round(corpus.mb, 2),
                "planted_pairs": len(corpus.planted),
                "planted_positives": positives,
                "planted_negatives": len(corpus.planted) - positives,
                "planted_jaccard_min_max": [round(float(planted_j.min()), 4), round(float(planted_j.max()), 4)],
                "rss_after_corpus_mb": round(rss_mb(), 1),
                "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
            }
        ),
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        near_of, extra = run_ours(corpus.texts, args.threshold, args.work_dir or Path(tmp))
    seconds = extra.pop("seconds")
    extra["signature_mb_s"] = round(corpus.mb / extra["signature_s"], 2)
    ours = line("ours", corpus, seconds, near_of, args.threshold, extra)

    minhashes, mh_s = datasketch_minhashes(corpus.texts)
    near_of, extra = datasketch_lsh(minhashes, args.threshold, (0.5, 0.5))
    base = line("datasketch", corpus, mh_s + extra["lsh_s"], near_of, args.threshold, {"minhash_s": round(mh_s, 3), **extra})
    # The same MinHashes indexed with our band choice: separates the speed gap from the recall gap.
    near_of, extra = datasketch_lsh(minhashes, args.threshold, DEDUP_LSH_WEIGHTS)
    same_bands = line(
        "datasketch_our_bands", corpus, mh_s + extra["lsh_s"], near_of, args.threshold, {"minhash_s": round(mh_s, 3), **extra}
    )

    summary = {
        "ours_mb_s": ours["mb_s"],
        "baseline_mb_s": base["mb_s"],
        "speedup": round(ours["mb_s"] / base["mb_s"], 2),
        "ours_recall": ours["recall"],
        "baseline_recall": base["recall"],
        "ours_precision": ours["precision"],
        "baseline_precision": base["precision"],
        "baseline_our_bands_recall": same_bands["recall"],
        "speedup_vs_baseline_our_bands": round(ours["mb_s"] / same_bands["mb_s"], 2),
        "ours_signature_mb_s": ours["signature_mb_s"],
        "docs": len(corpus.texts),
        "mb": round(corpus.mb, 2),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
