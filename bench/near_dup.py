"""Near-duplicate detection: ours (MinHasher + find_duplicates) against datasketch (MinHash + MinHashLSH).

Two planted corpora (`--corpus`):
- `sample` (default ~20 MB): documents recombined from paragraphs of the bundled sample corpus, with near copies
  of a few % of them aiming at Jaccard uniform in [0.9, 1);
- `heldout` (`bench/heldout_corpus.py`): docstrings of the standard library and pinned packages, not the bundled
  corpus, with copies at measured J 0.955-0.99 and near misses at J 0.85-0.935.
Every planted pair is labelled with its exact word 5-gram Jaccard.

Systems, all in this one process and thread, on the same corpus and shingles, clustered alike (union-find, the
lowest index survives):
- `ours`: LSH candidates at our bands (10 x 12), each decided by exact Jaccard (`opt.data.jaccard`);
- `ours_estimate_7x18`: the rule before exact decisions (7 x 18 bands, decided by the signature estimate), the
  reference for the time target (ours at most 1.2x it);
- `datasketch_our_bands`: datasketch's MinHashLSH with `params=(10, 12)`, candidates decided by
  `MinHash.jaccard` (its own rule): the headline peer, the same candidate generation as ours;
- `datasketch_our_bands_exact`: the same candidates decided by exact Jaccard of Python sets of the shingle
  strings: the same decisions as ours, so its recall and precision must equal ours;
- `datasketch`: datasketch's default band choice for the threshold (3 x 42) and its own rule.

Recall is over planted pairs with exact J >= threshold (and >= 0.96: the target band); `merged_below_094` counts
planted pairs at J <= 0.94 whose documents were merged, `precision_j94` is 1 - that / planted pairs merged; precision
is over every reported (document, survivor) pair, judged by its exact Jaccard. Times include the exact-duplicate
key and the signatures; ours and ours_estimate_7x18 run `--repeat` times alternating, and each reports its median run.

Prints one JSON line per system and a final summary line. `python bench/near_dup.py --mb 52 --corpus heldout`
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # heldout_corpus
from opt.data.dedup import DEDUP_LSH_MISS, find_duplicates  # noqa: E402
from opt.data.jaccard import texts_source  # noqa: E402
from opt.data.minhash import MinHasher, recall_bands  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "python-docs.jsonl"
WORD = re.compile(r"\w+")  # the normalisation both systems shingle: lowercase, split on non-word characters
NGRAM = 5
NUM_PERM = 128
TODAY_BANDS = (7, 18)  # the band choice before exact decisions (datasketch's optimiser at weights 0.02 / 0.98)


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


def survivors(near_of: np.ndarray) -> np.ndarray:
    """The document each one's chain of links ends at (ours links an exact duplicate to its first copy, which the
    near pass may remove in turn)."""
    survivor = np.where(near_of >= 0, near_of, np.arange(len(near_of)))
    while not np.array_equal(survivor[survivor], survivor):
        survivor = survivor[survivor]
    return survivor


def evaluate(corpus: Corpus, near_of: np.ndarray, threshold: float) -> dict:
    """Recall over planted pairs with exact J >= threshold (and >= 0.96); merges of planted pairs at J <= 0.94;
    precision over all reported (doc, survivor) pairs by their exact Jaccard."""
    survivor = survivors(near_of)
    merged = [(j, bool(survivor[a] == survivor[b])) for a, b, j in corpus.planted]
    hit = [m for j, m in merged if j >= threshold]
    hit96 = [m for j, m in merged if j >= 0.96]
    below = sum(m for j, m in merged if j <= 0.94)
    reported = np.flatnonzero(near_of >= 0)
    exact = [exact_jaccard(corpus.texts[i], corpus.texts[survivor[i]]) for i in reported]
    false = [j for j in exact if j < threshold]
    return {
        "recall": round(sum(hit) / max(len(hit), 1), 4),
        "recall_j96": round(sum(hit96) / max(len(hit96), 1), 4),
        "merged_below_094": int(below),
        "precision_j94": round(1 - below / max(sum(m for _, m in merged), 1), 4),
        "precision": round((len(exact) - len(false)) / max(len(exact), 1), 4),
        "reported": int(len(reported)),
        "false_removals": len(false),
        "fp_min_exact_j": round(min(false), 4) if false else None,
    }


def rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(
    texts: Sequence[str], threshold: float, work_dir: Path, exact: bool = True, bands: tuple[int, int] | None = None
) -> tuple[np.ndarray, dict]:
    """Ours end to end on in-memory texts: exact key, signatures, find_duplicates (exact decisions unless `exact=False`)."""
    t0 = time.perf_counter()
    # The caller's exact key (normalised text hash); part of our pipeline, so it is timed.
    hashes = np.fromiter((xxhash.xxh3_64_intdigest(" ".join(t.lower().split()).encode("utf-8")) for t in texts), np.uint64, len(texts))
    t1 = time.perf_counter()
    hasher = MinHasher(num_perm=NUM_PERM, ngram=NGRAM)
    sigs = hasher.signatures(texts)
    t2 = time.perf_counter()
    shingles = texts_source(texts, hasher.shingle_hashes) if exact else None
    res = find_duplicates(hashes, sigs, threshold, work_dir, bands=bands, shingles=shingles)
    t3 = time.perf_counter()
    # Planted copies are never exact duplicates; fold exact ones in anyway so every system is judged alike.
    near_of = np.where(res.exact_of >= 0, res.exact_of, res.near_of)
    st = res.near_stats
    counts = {"bands": st.bands, "rows": st.rows, "candidate_pairs": st.candidate_pairs, "checked": st.checked,
              "rejected": st.rejected, "candidate_docs": st.candidate_docs} if st else {}  # fmt: skip
    timing = {"exact_hash_s": round(t1 - t0, 3), "signature_s": round(t2 - t1, 3), "dedup_s": round(t3 - t2, 3), "seconds": t3 - t0}
    return near_of, {**timing, **counts}


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


def datasketch_lsh(
    minhashes: list, threshold: float, params: tuple[int, int] | None = None, texts: Sequence[str] | None = None
) -> tuple[np.ndarray, dict]:
    """MinHashLSH insert + query (default bands, or `params`), candidates decided by MinHash.jaccard or, given
    `texts`, by the exact Jaccard of Python sets of their shingle strings (built once per candidate document)."""
    from datasketch import MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, params=params)
    for i, m in enumerate(minhashes):
        lsh.insert(i, m, check_duplication=False)
    uf = _UnionFind(len(minhashes))
    sets: dict[int, set[str]] = {}

    def shingles_of(i: int) -> set[str]:
        if i not in sets:
            sets[i] = shingle_set(texts[i])  # type: ignore[index]
        return sets[i]

    candidates = 0
    for i, m in enumerate(minhashes):
        for j in lsh.query(m):
            if j < i:
                candidates += 1
                if texts is None:
                    same = m.jaccard(minhashes[j]) >= threshold
                else:
                    a, b = shingles_of(i), shingles_of(j)
                    same = len(a & b) / max(len(a | b), 1) >= threshold - 1e-12
                if same:
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of UTF-8 text")
    ap.add_argument("--corpus", choices=["sample", "heldout"], default="sample")
    ap.add_argument("--near-fraction", type=float, default=0.04, help="sample corpus: fraction of documents given a near copy")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of ours and ours_estimate_7x18 (median)")
    ap.add_argument("--work-dir", type=Path, default=None, help="spill directory for ours (default: system temp)")
    args = ap.parse_args(argv)

    if args.corpus == "heldout":
        from heldout_corpus import build_heldout

        corpus, name = build_heldout(args.mb, args.seed), "docstrings (stdlib + pinned packages), planted"
    else:
        corpus, name = build_corpus(args.mb, args.near_fraction, args.seed), "sample paragraphs recombined"
    planted_j = np.array([j for *_, j in corpus.planted])
    print(
        json.dumps(
            {
                "corpus": name,
                "docs": len(corpus.texts),
                "mb": round(corpus.mb, 2),
                "planted_pairs": len(corpus.planted),
                "planted_at_or_above_threshold": int((planted_j >= args.threshold).sum()),
                "planted_j96_and_above": int((planted_j >= 0.96).sum()),
                "planted_j94_and_below": int((planted_j <= 0.94).sum()),
                "planted_jaccard_min_max": [round(float(planted_j.min()), 4), round(float(planted_j.max()), 4)],
                "rss_after_corpus_mb": round(rss_mb(), 1),
                "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
            }
        ),
        flush=True,
    )

    ours_bands = recall_bands(args.threshold, NUM_PERM, DEDUP_LSH_MISS)
    every: dict[str, list[tuple[np.ndarray, dict]]] = {"ours": [], "ours_estimate_7x18": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            order = (("ours_estimate_7x18", False, TODAY_BANDS), ("ours", True, None))
            for system, exact, bands in order if r % 2 == 0 else order[::-1]:
                every[system].append(run_ours(corpus.texts, args.threshold, args.work_dir or Path(tmp), exact=exact, bands=bands))
    # the median run by total time (identical decisions every time: only the times differ)
    runs = {k: sorted(v, key=lambda run: run[1]["seconds"])[len(v) // 2] for k, v in every.items()}
    lines = {}
    decisions = {"ours": runs["ours"][0]}
    for system in ("ours", "ours_estimate_7x18"):
        near_of, extra = runs[system]
        seconds = extra.pop("seconds")
        extra["signature_mb_s"] = round(corpus.mb / extra["signature_s"], 2)
        lines[system] = line(system, corpus, seconds, near_of, args.threshold, extra)

    minhashes, mh_s = datasketch_minhashes(corpus.texts)
    peers = {
        "datasketch_our_bands": dict(params=ours_bands),
        "datasketch_our_bands_exact": dict(params=ours_bands, texts=corpus.texts),
        "datasketch": dict(),
    }
    for system, kw in peers.items():
        near_of, extra = datasketch_lsh(minhashes, args.threshold, **kw)  # type: ignore[arg-type]
        decisions[system] = near_of
        lines[system] = line(system, corpus, mh_s + extra["lsh_s"], near_of, args.threshold, {"minhash_s": round(mh_s, 3), **extra})

    ours, today, peer = lines["ours"], lines["ours_estimate_7x18"], lines["datasketch_our_bands"]
    summary = {
        "corpus": args.corpus,
        "mb": round(corpus.mb, 2),
        "ours_s": ours["seconds"],
        "time_vs_estimate_7x18": round(ours["seconds"] / today["seconds"], 3),
        "speedup_vs_datasketch_our_bands": round(peer["seconds"] / ours["seconds"], 2),
        "speedup_vs_datasketch_our_bands_exact": round(lines["datasketch_our_bands_exact"]["seconds"] / ours["seconds"], 2),
        "speedup_vs_datasketch_default": round(lines["datasketch"]["seconds"] / ours["seconds"], 2),
        **{f"{k}_recall_j96": v["recall_j96"] for k, v in lines.items()},
        **{f"{k}_merged_below_094": v["merged_below_094"] for k, v in lines.items()},
        **{f"{k}_precision": v["precision"] for k, v in lines.items()},
        "same_survivors_as_exact_peer": bool(
            np.array_equal(survivors(decisions["ours"]), survivors(decisions["datasketch_our_bands_exact"]))
        ),
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
