"""Training and validation batches read from a prepared dataset's packed token shards.

The batch for (step, rank) is a pure function of the seed and the step, so a resumed run reads
exactly the batches an uninterrupted run would: the loader's whole state is the step number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from opt import storage
from opt.data.manifest import DatasetError, DatasetManifest


def _verified(path: Path, sha256: str, cache_dir: str | Path) -> bool:
    """sha256 check of a token file, remembered per (path, size, mtime) so restarts do not re-hash shards."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{sha256}".encode()).hexdigest()
    marker = Path(cache_dir) / "verified" / key
    if marker.exists():
        return True
    if storage.sha256_file(path) != sha256:
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def open_tokens(manifest: DatasetManifest, rel: str, cache_dir: str | Path, verify: bool = True) -> np.ndarray:
    """Memory-map a token file of the dataset (downloading it first when the store is S3).

    A shard whose size or sha256 differs from the manifest is refused here, not discovered later as
    gibberish output; the hash is computed once per file version on each machine.
    """
    meta = manifest.files.get(rel)
    if meta is None:
        raise DatasetError(f"{manifest.uri}: manifest lists no {rel}")
    path = storage.local_path(manifest.file_uri(rel), cache_dir)
    if path.stat().st_size != meta["size"] or (verify and not _verified(path, meta["sha256"], cache_dir)):
        raise DatasetError(f"{path}: size or sha256 differs from the manifest; the dataset is corrupted, re-run data prep")
    if meta["size"] == 0:
        return np.zeros(0, dtype=manifest.token_dtype)
    return np.memmap(path, dtype=manifest.token_dtype, mode="r")


BLOCK = 1000  # samples per mixing block: each block holds every source in its weighted share


def _block_pattern(shares: np.ndarray) -> np.ndarray:
    """Source index for each of BLOCK slots: largest-remainder counts, spread evenly through the block."""
    exact = shares / shares.sum() * BLOCK
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: BLOCK - counts.sum()]] += 1
    counts[(counts == 0) & (shares > 0)] = 1  # a small source with weight must still be seen
    while counts.sum() > BLOCK:
        counts[np.argmax(counts)] -= 1
    # slot k of source s sits at (k + 0.5) / counts[s] of the way through the block
    keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
    owners = np.concatenate([np.full(c, s) for s, c in enumerate(counts)])
    return owners[np.argsort(keys, kind="stable")]


class TrainBatches:
    """Windows of seq_len + 1 tokens from one or more sources, mixed by weight, split across ranks.

    Each source is read in non-overlapping windows, reshuffled every epoch of that source. Sources
    are mixed in proportion to `weight x windows` (weight 1.0 everywhere: in proportion to size).
    The window for global sample i is a pure function of (seed, i), so resumed runs read the same data.
    """

    def __init__(
        self,
        sources: np.ndarray | list[tuple[np.ndarray, float]],
        seq_len: int,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
    ) -> None:
        if isinstance(sources, np.ndarray):
            sources = [(sources, 1.0)]
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.tokens = [t for t, _ in sources]
        self.n_windows = np.array([max(0, (len(t) - 1) // seq_len) for t in self.tokens], dtype=np.int64)
        shares = np.array([w for _, w in sources], dtype=np.float64) * self.n_windows
        if self.n_windows.sum() < micro_batch * world or shares.sum() <= 0:
            raise DatasetError(
                f"the training split has {int(self.n_windows.sum())} windows of {seq_len} tokens, fewer than one global batch "
                f"({micro_batch} x {world} ranks); lower data.seq_len or train.micro_batch_size"
            )
        self.pattern = _block_pattern(shares)
        # rank of each slot among its source's slots within a block
        self.slot_rank = np.zeros(BLOCK, dtype=np.int64)
        self.per_block = np.bincount(self.pattern, minlength=len(self.tokens))
        seen = np.zeros(len(self.tokens), dtype=np.int64)
        for k, s in enumerate(self.pattern):
            self.slot_rank[k] = seen[s]
            seen[s] += 1
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _window(self, i: int) -> tuple[int, int]:
        block, slot = divmod(i, BLOCK)
        s = int(self.pattern[slot])
        j = block * int(self.per_block[s]) + int(self.slot_rank[slot])  # j-th sample drawn from source s
        epoch, pos = divmod(j, int(self.n_windows[s]))
        perm = self._perms.get((s, epoch))
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = self._perms[(s, epoch)] = np.random.default_rng([self.seed, s, epoch]).permutation(int(self.n_windows[s]))
        return s, int(perm[pos])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro_batch, seq_len), for this rank at `step`."""
        first = (step * self.world + self.rank) * self.micro_batch
        rows = []
        for i in range(first, first + self.micro_batch):
            s, w = self._window(i)
            start = w * self.seq_len
            rows.append(np.asarray(self.tokens[s][start : start + self.seq_len + 1], dtype=np.int64))
        block = torch.from_numpy(np.stack(rows))
        return block[:, :-1], block[:, 1:]


def open_train_sources(manifest: DatasetManifest, cache_dir: str | Path, verify: bool = True) -> list[tuple[np.ndarray, float]]:
    """Each source's training token stream with its mixture weight."""
    return [(open_tokens(manifest, f"train/{name}.bin", cache_dir, verify), manifest.weights.get(name, 1.0)) for name in manifest.sources]


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows covering every predictable token once; a final shorter window comes alone."""
    n = len(tokens) - 1
    full = n // seq_len

    def window(start: int, width: int) -> np.ndarray:
        return np.asarray(tokens[start : start + width + 1], dtype=np.int64)

    for b in range(0, full, batch_size):
        block = torch.from_numpy(np.stack([window(i * seq_len, seq_len) for i in range(b, min(b + batch_size, full))]))
        yield block[:, :-1], block[:, 1:]
    if n - full * seq_len > 0:
        block = torch.from_numpy(window(full * seq_len, n - full * seq_len)[None])
        yield block[:, :-1], block[:, 1:]
