"""Exact and MinHash-LSH near-duplicate detection for 1e8+ documents in bounded memory (OPT: Jaccard >= 0.95).

Both passes spill (key, doc) records to `partitions` files chosen by key, then sort one file at a time, so the
working set is about 1/partitions of the records instead of every hash and band key at once:

    exact:  key = the caller's uint64 hash of the normalised text; equal keys -> the lowest index survives.
    near:   exact survivors only; key = 64-bit hash of each LSH band of the signature; docs sharing a key are
            candidates, verified by the fraction of equal signature entries, and verified pairs are merged with a
            union-find whose root is always the lowest index of its cluster.

Global index order is priority. Every key's group lands whole in one partition with its members in index order,
and connected components do not depend on the order edges arrive in, so the result is the same for any partition
count and any processing order.

Memory per document, besides the inputs (which may be np.memmap): the outputs (1 + 8 + 8 + 4 = 21 bytes; the
union-find array becomes `near_of`), plus per partition 12 bytes per record (1 exact record, `bands` near records
per document) and the sort of that partition. Disk: 12 * (1 + bands) bytes per document, deleted when done.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from opt.data.minhash import fmix64, lsh_params

# Rows of hashes or signatures read from (possibly memory-mapped) inputs per step: 65536 x 128 uint32 = 32 MiB.
_CHUNK_ROWS = 1 << 16
# Candidate pairs verified per step: two gathers of 16384 x 128 uint32 = 16 MiB.
_PAIR_BATCH = 1 << 14
# Groups sharing a band key with at most this many members are verified on all pairs (at most 28); larger groups
# only against their lowest index plus consecutive members, so 1000 identical documents make ~2000 pairs, not 5e5.
_ALL_PAIRS_MAX = 8
# (false positive, false negative) weights for choosing bands x rows. datasketch's default 0.5/0.5 picks 3 x 42 at
# threshold 0.95, which makes only 31% of pairs at exactly 0.95 (62% at 0.97) candidates. Here every candidate is
# verified on its full signature, so a spurious candidate costs one comparison while a missed one leaves a duplicate
# in the training set; 0.02/0.98 picks 7 x 18: 97% of pairs at 0.95 become candidates, 12% of those at 0.8.
DEDUP_LSH_WEIGHTS = (0.02, 0.98)

_U64 = np.uint64
_BAND_MUL = _U64(0x9E3779B97F4A7C15)
_SHIFT_32 = _U64(32)


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
    """float32 (n,): estimated Jaccard (fraction of equal signature entries) to `near_of`; 0 where none."""

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
) -> DedupResult:
    """Exact then near-duplicate detection; the lowest index of every duplicate set survives.

    Args:
        exact_hashes: uint64 (n,), a hash of each document's normalised text (np.memmap is fine).
        signatures: uint32 (n, num_perm) MinHash signatures from `opt.data.minhash.MinHasher` (np.memmap is fine).
        threshold: Jaccard threshold; a candidate pair is a near duplicate when at least this fraction of its
            signature entries are equal.
        work_dir: directory for the spill files (a private subdirectory is created and removed); None = system temp.
        partitions: number of spill files per pass; peak memory of the sort is ~1/partitions of all records.
        near: False runs exact deduplication only.
        bands: (bands, rows) override; default `lsh_params(threshold, num_perm, *DEDUP_LSH_WEIGHTS)`.
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
    if n > 1:
        # 12-byte records while document indices fit in uint32 (n < 4.3e9), 16-byte beyond.
        doc_dtype = np.dtype(np.uint32) if n < 2**32 else np.dtype(np.int64)
        with _spill_dir(work_dir) as spill:
            _exact_pass(exact_hashes, exact_of, _Partitions(spill, "exact", partitions, doc_dtype))
            if near:
                num_perm = signatures.shape[1]
                b, r = bands if bands is not None else lsh_params(threshold, num_perm, *DEDUP_LSH_WEIGHTS)
                if b < 1 or r < 1 or b * r > num_perm:
                    raise ValueError(f"bands x rows = {b} x {r} must be positive and fit num_perm={num_perm}")
                min_equal = math.ceil(threshold * num_perm - 1e-9)
                parts = _Partitions(spill, "band", partitions, doc_dtype)
                near_of = _near_pass(signatures, exact_of, b, r, min_equal, parts)
                _fill_similarity(signatures, near_of, similarity)
    if near_of is None:
        near_of = np.full(n, -1, dtype=np.int64)
    keep = (exact_of < 0) & (near_of < 0)
    return DedupResult(keep=keep, exact_of=exact_of, near_of=near_of, near_similarity=similarity)


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
        order = np.argsort(part, kind="stable")  # stable: docs stay in order inside each partition
        records = np.empty(len(keys), dtype=self.dtype)
        records["key"] = keys[order]
        records["doc"] = docs[order]
        bounds = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=self.count))])
        for p in np.flatnonzero(np.diff(bounds)):
            with open(self.paths[p], "ab") as f:
                records[bounds[p] : bounds[p + 1]].tofile(f)

    def read(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Partition p's (keys, docs) sorted by key, equal keys in document order; deletes the file."""
        path = self.paths[p]
        if not path.exists():
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        records = np.fromfile(path, dtype=self.dtype)
        path.unlink()
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


def _near_pass(signatures: np.ndarray, exact_of: np.ndarray, bands: int, rows: int, min_equal: int, parts: _Partitions) -> np.ndarray:
    """near_of for the exact survivors: -1, or the lowest index of the document's verified near-duplicate cluster."""
    n = len(exact_of)
    for s in range(0, n, _CHUNK_ROWS):
        e = min(s + _CHUNK_ROWS, n)
        survivors = np.flatnonzero(exact_of[s:e] < 0)
        if survivors.size:
            sig = np.asarray(signatures[s:e])[survivors]
            # Row-major ravel: records go out in document order, as _Partitions.append requires.
            parts.append(_band_keys(sig, bands, rows).ravel(), np.repeat(survivors + s, bands))

    # Union-find over document indices. Links always point from the larger to the smaller index, so a root is the
    # lowest index of its cluster, whatever order the pairs are merged in.
    parent = np.arange(n, dtype=np.int64)
    for p in range(parts.count):
        keys, docs = parts.read(p)
        a, b = _candidate_pairs(keys, docs)
        if a.size:
            ra, rb = _find(parent, a), _find(parent, b)
            todo = ra != rb  # already in one cluster (an earlier band or partition): no need to verify again
            _verify_and_union(parent, a[todo], b[todo], signatures, min_equal)

    # Resolve every document to its root and turn the array into near_of in place (-1 for roots). High chunks go
    # first: a find only walks to lower indices, which must still hold parent links, not -1.
    for s in reversed(range(0, n, _CHUNK_ROWS)):
        idx = np.arange(s, min(s + _CHUNK_ROWS, n))
        roots = _find(parent, idx)
        roots[roots == idx] = -1
        parent[idx] = roots
    return parent


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


def _verify_and_union(parent: np.ndarray, a: np.ndarray, b: np.ndarray, signatures: np.ndarray, min_equal: int) -> None:
    """Union every pair whose signatures agree on at least `min_equal` entries."""
    for s in range(0, len(a), _PAIR_BATCH):
        pa, pb = a[s : s + _PAIR_BATCH], b[s : s + _PAIR_BATCH]
        equal = np.count_nonzero(np.asarray(signatures[pa]) == np.asarray(signatures[pb]), axis=1)
        ok = equal >= min_equal
        _union(parent, pa[ok], pb[ok])


def _fill_similarity(signatures: np.ndarray, near_of: np.ndarray, similarity: np.ndarray) -> None:
    """similarity[i] = fraction of equal signature entries between i and near_of[i], for near duplicates."""
    members = np.flatnonzero(near_of >= 0)
    for s in range(0, len(members), _PAIR_BATCH):
        i = members[s : s + _PAIR_BATCH]
        equal = np.asarray(signatures[i]) == np.asarray(signatures[near_of[i]])
        similarity[i] = equal.mean(axis=1)
