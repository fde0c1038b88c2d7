"""Exact and MinHash-LSH near-duplicate detection for 1e8+ documents in bounded memory (OPT: Jaccard >= 0.95).

Both passes spill (key, doc) records to `partitions` files chosen by key, then sort one file at a time, so the
working set is about 1/partitions of the records instead of every hash and band key at once:

    exact:  key = the caller's uint64 hash of the normalised text; equal keys -> the lowest index survives.
    near:   exact survivors only; key = 64-bit hash of each LSH band of the signature; docs sharing a key are
            candidates. Candidate pairs are spilled by range of their lower index, then each is decided by the
            exact Jaccard of the two shingle sets (`opt.data.jaccard`; only candidate documents are read), and
            accepted pairs are merged with a union-find whose root is always the lowest index of its cluster.
            Without a shingle source the decision falls back to the signature estimate (fraction of equal entries).

Global index order is priority. Every key's group lands whole in one partition with its members in index order,
and connected components do not depend on the order edges arrive in, so the result is the same for any partition
count and any processing order.

Memory per document, besides the inputs (which may be np.memmap): the outputs (1 + 8 + 8 + 4 + 4 = 25 bytes; the
union-find array becomes `near_of`) and a candidate mask (1 byte), plus per partition 12 bytes per record (1 exact
record, `bands` near records per document) and the sort of that partition; for the exact decision, 16 bytes per
candidate document and one pair file (16 bytes per pair) at a time. Disk: 12 * (1 + bands) bytes per document,
16 bytes per candidate pair and 8 per shingle of each candidate document, deleted when done.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from opt.data.jaccard import PairSpill, ShingleSource, ShingleStore, append_partitioned, passes, take_partition
from opt.data.minhash import fmix64, recall_bands

# Rows of hashes or signatures read from (possibly memory-mapped) inputs per step: 65536 x 128 uint32 = 32 MiB.
_CHUNK_ROWS = 1 << 16
# Candidate pairs verified per step: two gathers of 16384 x 128 uint32 = 16 MiB.
_PAIR_BATCH = 1 << 14
# Groups sharing a band key with at most this many members are verified on all pairs (at most 28); larger groups
# only against their lowest index plus consecutive members, so 1000 identical documents make ~2000 pairs, not 5e5.
_ALL_PAIRS_MAX = 8
# Bands x rows: `recall_bands` takes the most rows (fewest spurious candidates) that still make a pair at exactly
# the threshold a candidate with probability >= 1 - DEDUP_LSH_MISS. At 0.95 and 128 permutations that is 10 x 12:
# 99.96% of pairs at 0.95 become candidates, 99.99% at 0.96, 51% at 0.8, 0.2% at 0.5. datasketch's default weights
# pick 3 x 42 (31% at 0.95). A spurious candidate costs one exact comparison; a missed one leaves a copy in.
DEDUP_LSH_MISS = 1e-3

log = logging.getLogger(__name__)

_U64 = np.uint64
_BAND_MUL = _U64(0x9E3779B97F4A7C15)
_SHIFT_32 = _U64(32)


@dataclass
class NearStats:
    """Counts of the near pass, for the dataset manifest."""

    bands: int
    rows: int
    decision: str
    """`exact_jaccard` (shingle sets) or `estimate` (signature agreement)."""
    candidate_pairs: int = 0
    """Pairs that shared a band key: distinct for the exact decision; for the estimate, once per band partition."""
    checked: int = 0
    """Candidate pairs decided; the others were already joined through other pairs."""
    rejected: int = 0
    """Checked pairs below the threshold."""
    candidate_docs: int = 0
    """Documents in some candidate pair (the exact decision reads only these)."""


@dataclass
class DedupResult:
    """Per-document verdicts, indexed like the inputs."""

    keep: np.ndarray
    """bool (n,): neither an exact nor a near duplicate of a document that comes earlier in priority order."""
    exact_of: np.ndarray
    """int64 (n,): -1, or the index of the kept document whose exact hash this document shares."""
    near_of: np.ndarray
    """int64 (n,): -1, or the index of the kept document that survives this document's near-duplicate cluster."""
    near_similarity: np.ndarray
    """float32 (n,): Jaccard to `near_of`, exact when a shingle source decided (else the estimate); 0 where none.
    A cluster member joined through another member can be below the threshold to the survivor itself."""
    near_estimate: np.ndarray
    """float32 (n,): the signature estimate of the same Jaccard (fraction of equal entries); 0 where none."""
    near_stats: NearStats | None = None
    """How the near pass decided; None when it did not run."""

    @property
    def exact_count(self) -> int:
        """Documents dropped as exact duplicates."""
        return int(np.count_nonzero(self.exact_of >= 0))

    @property
    def near_count(self) -> int:
        """Documents dropped as near duplicates (of exact survivors)."""
        return int(np.count_nonzero(self.near_of >= 0))


def find_duplicates(
    exact_hashes: np.ndarray,
    signatures: np.ndarray,
    threshold: float = 0.95,
    work_dir: Path | str | PathLike[str] | None = None,
    partitions: int = 64,
    near: bool = True,
    *,
    bands: tuple[int, int] | None = None,
    shingles: ShingleSource | None = None,
) -> DedupResult:
    """Exact then near-duplicate detection; the lowest index of every duplicate set survives.

    Args:
        exact_hashes: uint64 (n,), a hash of each document's normalised text (np.memmap is fine).
        signatures: uint32 (n, num_perm) MinHash signatures from `opt.data.minhash.MinHasher` (np.memmap is fine).
        threshold: Jaccard threshold; a candidate pair is a near duplicate when its Jaccard is at least this.
        work_dir: directory for the spill files (a private subdirectory is created and removed); None = system temp.
        partitions: number of spill files per pass; peak memory of the sort is ~1/partitions of all records.
        near: False runs exact deduplication only.
        bands: (bands, rows) override; default `recall_bands(threshold, num_perm, DEDUP_LSH_MISS)`.
        shingles: the documents' shingle hashes (see `opt.data.jaccard.ShingleSource`), asked only for candidate
            documents: candidates are then decided by exact Jaccard. None decides by the signature estimate.
    """
    n = len(exact_hashes)
    if np.ndim(exact_hashes) != 1:
        raise ValueError(f"exact_hashes must be one-dimensional, got shape {np.shape(exact_hashes)}")
    if near and (np.ndim(signatures) != 2 or len(signatures) != n):
        raise ValueError(f"signatures must have shape (n={n}, num_perm), got {np.shape(signatures)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")

    exact_of = np.full(n, -1, dtype=np.int64)
    near_of: np.ndarray | None = None  # the near pass returns its union-find array as near_of: no second n-array
    similarity = np.zeros(n, dtype=np.float32)
    estimate = np.zeros(n, dtype=np.float32)
    stats: NearStats | None = None
    if n > 1:
        # 12-byte records while document indices fit in uint32 (n < 4.3e9), 16-byte beyond.
        doc_dtype = np.dtype(np.uint32) if n < 2**32 else np.dtype(np.int64)
        with _spill_dir(work_dir) as spill:
            _exact_pass(exact_hashes, exact_of, _Partitions(spill, "exact", partitions, doc_dtype))
            if near:
                num_perm = signatures.shape[1]
                b, r = bands if bands is not None else recall_bands(threshold, num_perm, DEDUP_LSH_MISS)
                if b < 1 or r < 1 or b * r > num_perm:
                    raise ValueError(f"bands x rows = {b} x {r} must be positive and fit num_perm={num_perm}")
                stats = NearStats(bands=b, rows=r, decision="estimate" if shingles is None else "exact_jaccard")
                parts = _Partitions(spill, "band", partitions, doc_dtype)
                decider = _Decider(signatures, threshold, shingles, spill, partitions)
                try:
                    near_of = _near_pass(signatures, exact_of, parts, stats, decider)
                    _fill_estimate(signatures, near_of, estimate)
                    similarity = decider.similarity(near_of, estimate)
                finally:
                    decider.close()
    if near_of is None:
        near_of = np.full(n, -1, dtype=np.int64)
    keep = (exact_of < 0) & (near_of < 0)
    return DedupResult(keep, exact_of, near_of, similarity, estimate, stats)


@contextmanager
def _spill_dir(work_dir: Path | str | PathLike[str] | None) -> Iterator[Path]:
    """A private directory under `work_dir` (several dedup runs may share one), removed even on error."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="dedup-", dir=work_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _Partitions:
    """Append-only spill files of packed (key uint64, doc) records; a record's file is chosen by its mixed key."""

    def __init__(self, directory: Path, name: str, count: int, doc_dtype: np.dtype) -> None:
        self.count = count
        self.dtype = np.dtype([("key", "<u8"), ("doc", doc_dtype)])
        self.paths = [directory / f"{name}-{p:05d}.bin" for p in range(count)]

    def append(self, keys: np.ndarray, docs: np.ndarray) -> None:
        """Append records; `docs` must be non-decreasing across all calls, which `read` relies on."""
        # Mix before taking the modulus so that a caller's hash with weak low bits still spreads evenly.
        part = (fmix64(keys.copy()) % _U64(self.count)).astype(np.intp)
        records = np.empty(len(keys), dtype=self.dtype)
        records["key"], records["doc"] = keys, docs
        append_partitioned(self.paths, part, records)  # stable: docs stay in order inside each partition

    def read(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Partition p's (keys, docs) sorted by key, equal keys in document order; deletes the file."""
        records = take_partition(self.paths[p], self.dtype)
        keys = records["key"]
        # Records were appended in document order, so a stable sort by key keeps each group in document order.
        order = np.argsort(keys, kind="stable")
        return keys[order], records["doc"][order].astype(np.int64)


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """bool mask: True where a run of equal keys begins (keys sorted)."""
    new = np.empty(len(keys), dtype=bool)
    new[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=new[1:])
    return new


def _exact_pass(exact_hashes: np.ndarray, exact_of: np.ndarray, parts: _Partitions) -> None:
    """Fill exact_of: every document with an earlier document of equal hash points at the first one."""
    n = len(exact_of)
    for s in range(0, n, _CHUNK_ROWS):
        e = min(s + _CHUNK_ROWS, n)
        parts.append(np.asarray(exact_hashes[s:e], dtype=np.uint64), np.arange(s, e))
    for p in range(parts.count):
        keys, docs = parts.read(p)
        new = _group_starts(keys)
        first = docs[np.flatnonzero(new)][np.cumsum(new) - 1]  # each record's group head = its lowest index
        exact_of[docs[~new]] = first[~new]


def _band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 (m, bands): a hash of each band's `rows` signature entries, seeded by the band's index.

    The seed keeps equal values in different bands apart. A 64-bit collision only adds a candidate, which
    verification rejects.
    """
    cols = np.ascontiguousarray(sig[:, : bands * rows].T, dtype=np.uint64)  # (bands*rows, m): contiguous columns
    keys = np.empty((len(sig), bands), dtype=np.uint64)
    for band in range(bands):
        h = np.full(len(sig), fmix64(np.array([band + 1], dtype=np.uint64))[0], dtype=np.uint64)
        for j in range(band * rows, (band + 1) * rows):
            h ^= cols[j]
            h *= _BAND_MUL  # odd multiplier: a bijection of h, so a change in one entry always changes the key
            h ^= h >> _SHIFT_32  # fold the high bits (where the products carry) back into the low ones
        keys[:, band] = fmix64(h)
    return keys


def _near_pass(signatures: np.ndarray, exact_of: np.ndarray, parts: _Partitions, stats: NearStats, decider: _Decider) -> np.ndarray:
    """near_of for the exact survivors: -1, or the lowest index of the document's near-duplicate cluster."""
    n = len(exact_of)
    for s in range(0, n, _CHUNK_ROWS):
        e = min(s + _CHUNK_ROWS, n)
        survivors = np.flatnonzero(exact_of[s:e] < 0)
        if survivors.size:
            sig = np.asarray(signatures[s:e])[survivors]
            # Row-major ravel: records go out in document order, as _Partitions.append requires.
            parts.append(_band_keys(sig, stats.bands, stats.rows).ravel(), np.repeat(survivors + s, stats.bands))

    # Union-find over document indices. Links always point from the larger to the smaller index, so a root is the
    # lowest index of its cluster, whatever order the pairs are merged in.
    parent = np.arange(n, dtype=np.int64)
    for p in range(parts.count):
        keys, docs = parts.read(p)
        a, b = _candidate_pairs(keys, docs)
        if a.size:
            decider.candidates(parent, a, b, stats)
    decider.decide(parent, stats)

    # Resolve every document to its root and turn the array into near_of in place (-1 for roots). High chunks go
    # first: a find only walks to lower indices, which must still hold parent links, not -1.
    for s in reversed(range(0, n, _CHUNK_ROWS)):
        idx = np.arange(s, min(s + _CHUNK_ROWS, n))
        roots = _find(parent, idx)
        roots[roots == idx] = -1
        parent[idx] = roots
    return parent


class _Decider:
    """Decides candidate pairs: by exact Jaccard when a shingle source is given, else by signature agreement.

    The estimate decides each band partition's pairs at once. The exact decision first collects every pair (spilled
    by range of the lower index) and the set of candidate documents, then reads those documents' shingles once and
    decides one pair file at a time. Either way a pair whose two documents are already in one cluster is skipped:
    it cannot change the clusters, so the result does not depend on the order pairs are decided in.
    """

    def __init__(self, signatures: np.ndarray, threshold: float, shingles: ShingleSource | None, spill: Path, partitions: int) -> None:
        n = len(signatures)
        self.signatures, self.threshold, self.shingles, self.spill = signatures, threshold, shingles, spill
        self.min_equal = math.ceil(threshold * signatures.shape[1] - 1e-9)
        self.store: ShingleStore | None = None
        if shingles is not None:
            self.pairs = PairSpill(spill, n, partitions)
            self.is_candidate = np.zeros(n, dtype=bool)

    def candidates(self, parent: np.ndarray, a: np.ndarray, b: np.ndarray, stats: NearStats) -> None:
        if self.shingles is not None:
            self.pairs.append(a, b)
            self.is_candidate[a] = self.is_candidate[b] = True
            return
        stats.candidate_pairs += len(a)
        for s in range(0, len(a), _PAIR_BATCH):
            pa, pb = _unjoined(parent, a[s : s + _PAIR_BATCH], b[s : s + _PAIR_BATCH])
            equal = np.count_nonzero(np.asarray(self.signatures[pa]) == np.asarray(self.signatures[pb]), axis=1)
            ok = equal >= self.min_equal
            stats.checked += len(pa)
            stats.rejected += int(np.count_nonzero(~ok))
            _union(parent, pa[ok], pb[ok])

    def decide(self, parent: np.ndarray, stats: NearStats) -> None:
        if self.shingles is None:
            return
        docs = np.flatnonzero(self.is_candidate)
        del self.is_candidate
        stats.candidate_docs = len(docs)
        log.info("near dedup: reading the shingles of %d candidate documents", len(docs))
        self.store = ShingleStore(self.spill / "shingles.u64", docs, self.shingles)
        for p in range(self.pairs.count):
            a, b = self.pairs.read(p)
            stats.candidate_pairs += len(a)
            for s in range(0, len(a), _PAIR_BATCH):
                pa, pb = _unjoined(parent, a[s : s + _PAIR_BATCH], b[s : s + _PAIR_BATCH])
                ok = passes(self.store.jaccard(pa, pb, self.threshold), self.threshold)
                stats.checked += len(pa)
                stats.rejected += int(np.count_nonzero(~ok))
                _union(parent, pa[ok], pb[ok])
        log.info("near dedup: %d candidate pairs, %d checked, %d rejected", stats.candidate_pairs, stats.checked, stats.rejected)

    def similarity(self, near_of: np.ndarray, estimate: np.ndarray) -> np.ndarray:
        """Jaccard of each removed document to its survivor: exact when decided exactly, else the estimate."""
        if self.store is None:
            return estimate.copy()
        out = np.zeros(len(near_of), dtype=np.float32)
        members = np.flatnonzero(near_of >= 0)
        for s in range(0, len(members), _PAIR_BATCH):
            i = members[s : s + _PAIR_BATCH]
            order = np.argsort(near_of[i], kind="stable")  # by survivor: each survivor's set is read once
            out[i[order]] = self.store.jaccard(near_of[i][order], i[order], 0.0)
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def _unjoined(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose documents are not yet in one cluster."""
    todo = _find(parent, a) != _find(parent, b)
    return a[todo], b[todo]


def _candidate_pairs(keys: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique (a, b), a < b, of documents sharing a band key; `keys` sorted, each group in ascending doc order."""
    m = len(keys)
    if m < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    new = _group_starts(keys)
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    pos = np.arange(m) - starts[group]  # position inside the group; 0 = the group's lowest index
    size = np.diff(np.append(starts, m))[group]

    star = np.flatnonzero(pos >= 1)  # every member with the group's lowest index
    chain = np.flatnonzero(pos >= 2)  # consecutive members (pos 1 is already paired with the head)
    firsts, seconds = [docs[starts[group[star]]], docs[chain - 1]], [docs[star], docs[chain]]
    for d in range(2, _ALL_PAIRS_MAX - 1):  # small groups: the remaining distances give all pairs
        far = np.flatnonzero((size <= _ALL_PAIRS_MAX) & (pos > d))
        firsts.append(docs[far - d])
        seconds.append(docs[far])
    a, b = np.concatenate(firsts), np.concatenate(seconds)
    distinct = a != b  # the same document twice in a group needs two of its band keys to collide
    a, b = a[distinct], b[distinct]
    if len(docs) and int(docs.max()) < 2**31:
        packed = np.unique((a << 32) | b)  # sorted by a: verification then reads signatures in index order
        return packed >> 32, packed & 0xFFFFFFFF
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of x (vectorised), compressing the path of every queried node to point straight at its root."""
    root = parent[x]
    while True:
        up = parent[root]
        if np.array_equal(up, root):
            break
        root = up
    parent[x] = root
    return root


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the clusters of each pair (a[i], b[i]); the larger root is linked under the smaller."""
    while a.size:
        ra, rb = _find(parent, a), _find(parent, b)
        differ = ra != rb
        if not differ.any():
            return
        lo = np.minimum(ra[differ], rb[differ])
        hi = np.maximum(ra[differ], rb[differ])
        # Several pairs may share a root `hi`: keep the smallest `lo`; the others are linked on the next round.
        np.minimum.at(parent, hi, lo)
        a, b = lo, hi


def _fill_estimate(signatures: np.ndarray, near_of: np.ndarray, estimate: np.ndarray) -> None:
    """estimate[i] = fraction of equal signature entries between i and near_of[i], for near duplicates."""
    members = np.flatnonzero(near_of >= 0)
    for s in range(0, len(members), _PAIR_BATCH):
        i = members[s : s + _PAIR_BATCH]
        equal = np.asarray(signatures[i]) == np.asarray(signatures[near_of[i]])
        estimate[i] = equal.mean(axis=1)
