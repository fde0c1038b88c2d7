"""Exact Jaccard of candidate pairs: the shingle sets of candidate documents, spilled to disk, and the decision.

MinHash LSH only proposes pairs. Each proposed pair is decided by the exact Jaccard of the two documents' shingle
sets (the word n-grams `opt.data.minhash.MinHasher` signs, as 64-bit hashes: distinct shingles collide with
probability ~2^-64, so two documents of 1e5 shingles each share a spurious hash with probability < 1e-9).

Only documents that appear in some candidate pair are read. Their sorted, de-duplicated shingle hashes go to one
spill file; memory holds 16 bytes per candidate document (its index and offset) and the two sets being compared.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Candidate documents read between two progress lines.
_PROGRESS_EVERY = 1 << 20

ShingleSource = Callable[[np.ndarray], Iterable[tuple[int, np.ndarray]]]
"""Given ascending document indices, yields (index, uint64 shingle hashes) for each of them, in that order."""


def texts_source(texts: Sequence[str], shingle_hashes: Callable[[Sequence[str]], list[np.ndarray]], batch: int = 1024) -> ShingleSource:
    """A ShingleSource over texts held in memory, e.g. `texts_source(texts, MinHasher().shingle_hashes)`."""

    def source(docs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, len(docs), batch):
            chunk = [int(d) for d in docs[s : s + batch]]
            yield from zip(chunk, shingle_hashes([texts[d] for d in chunk]), strict=True)

    return source


# Slack on the threshold comparison: J = i / u is compared as a float, and 19/20 must pass a 0.95 threshold.
_EPS = 1e-12


def _sorted_distinct(h: np.ndarray) -> np.ndarray:
    """`h` sorted without repeats; a source's output usually is already (MinHasher.shingle_hashes), so check first."""
    if len(h) < 2 or bool((h[1:] > h[:-1]).all()):
        return h
    h = np.sort(h)
    return h[np.concatenate([[True], h[1:] != h[:-1]])]


def jaccard_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two sorted arrays of distinct values; two empty sets are equal (1.0)."""
    if len(a) > len(b):
        a, b = b, a  # look the smaller set up in the larger one
    if not len(b):
        return 1.0
    if not len(a):
        return 0.0
    pos = np.searchsorted(b, a)
    pos[pos == len(b)] = 0  # past the end: cannot match (b[0] < a there), any in-range index will do
    inter = int(np.count_nonzero(b[pos] == a))
    return inter / (len(a) + len(b) - inter)


def passes(j: np.ndarray, threshold: float) -> np.ndarray:
    """The near-duplicate rule on exact Jaccards (elementwise)."""
    return np.asarray(j) >= threshold - _EPS


class ShingleStore:
    """Sorted shingle hashes of a fixed, ascending set of documents, in one file read by offset."""

    def __init__(self, path: Path, docs: np.ndarray, source: ShingleSource) -> None:
        """Write the sets of `docs` (ascending int64) as `source` yields them; refuses a source that skips or reorders."""
        self.path = path
        self.docs = np.asarray(docs, dtype=np.int64)
        self.offsets = np.zeros(len(self.docs) + 1, dtype=np.int64)
        k = 0
        with open(path, "wb") as f:
            for doc, hashes in source(self.docs):
                if k >= len(self.docs) or int(doc) != self.docs[k]:
                    want = int(self.docs[k]) if k < len(self.docs) else "nothing"
                    raise ValueError(f"shingle source yielded document {doc} where {want} was expected")
                unique = _sorted_distinct(np.asarray(hashes, dtype=np.uint64))
                unique.tofile(f)
                self.offsets[k + 1] = self.offsets[k] + len(unique)
                k += 1
                if k % _PROGRESS_EVERY == 0:
                    log.info("near dedup: shingles of %d of %d candidate documents read", k, len(self.docs))
        if k != len(self.docs):
            raise ValueError(f"shingle source yielded {k} of {len(self.docs)} documents (stopped at {self.docs[k]})")
        self._fd = os.open(path, os.O_RDONLY)

    def sizes(self, docs: np.ndarray) -> np.ndarray:
        """Number of distinct shingles of each document (all must be in the store)."""
        rank = np.searchsorted(self.docs, docs)
        return self.offsets[rank + 1] - self.offsets[rank]

    def get(self, doc: int) -> np.ndarray:
        rank = int(np.searchsorted(self.docs, doc))
        if rank >= len(self.docs) or self.docs[rank] != doc:
            raise KeyError(f"document {doc} is not a candidate")
        start, end = int(self.offsets[rank]), int(self.offsets[rank + 1])
        return np.frombuffer(os.pread(self._fd, 8 * (end - start), 8 * start), dtype=np.uint64)

    def jaccard(self, a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
        """Exact Jaccard of each pair (a[i], b[i]); pairs whose set sizes alone rule out `threshold` get their bound
        min/max (< threshold) without reading the sets. Consecutive pairs with the same `a` read it once."""
        out = np.empty(len(a), dtype=np.float64)
        na, nb = self.sizes(a), self.sizes(b)
        bound = np.minimum(na, nb) / np.maximum(np.maximum(na, nb), 1)
        bound[(na == 0) & (nb == 0)] = 1.0
        last, set_a = -1, np.empty(0, dtype=np.uint64)
        for i in range(len(a)):
            if bound[i] < threshold - _EPS:
                out[i] = bound[i]
                continue
            if a[i] != last:
                last, set_a = int(a[i]), self.get(int(a[i]))
            out[i] = jaccard_sorted(set_a, self.get(int(b[i])))
        return out

    def close(self) -> None:
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


def append_partitioned(paths: list[Path], part: np.ndarray, records: np.ndarray) -> None:
    """Append each record to the file its `part` names; records keep their order inside each file."""
    order = np.argsort(part, kind="stable")
    records = records[order]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=len(paths)))])
    for p in np.flatnonzero(np.diff(bounds)):
        with open(paths[p], "ab") as f:
            records[bounds[p] : bounds[p + 1]].tofile(f)


def take_partition(path: Path, dtype: np.dtype) -> np.ndarray:
    """A partition file's records (none if nothing was appended to it); deletes the file."""
    if not path.exists():
        return np.empty(0, dtype=dtype)
    records = np.fromfile(path, dtype=dtype)
    path.unlink()
    return records


class PairSpill:
    """Candidate pairs (a < b) in `count` files by range of `a`, read back one file at a time, sorted and unique."""

    def __init__(self, directory: Path, n: int, count: int) -> None:
        self.count = count
        self.block = max(1, -(-n // count))
        self.paths = [directory / f"pairs-{p:05d}.bin" for p in range(count)]
        self.dtype = np.dtype([("a", "<i8"), ("b", "<i8")])

    def append(self, a: np.ndarray, b: np.ndarray) -> None:
        records = np.empty(len(a), dtype=self.dtype)
        records["a"], records["b"] = a, b
        append_partitioned(self.paths, a // self.block, records)

    def read(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """File p's distinct pairs, sorted by (a, b); deletes the file."""
        records = take_partition(self.paths[p], self.dtype)
        a, b = records["a"], records["b"]
        order = np.lexsort((b, a))
        a, b = a[order], b[order]
        new = np.ones(len(a), dtype=bool)
        new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        return a[new], b[new]
