"""Training and validation batches read from a prepared dataset's packed token shards.

The batch for (step, rank) is a pure function of the seed and the step, so a resumed run reads
exactly the batches an uninterrupted run would: the loader's whole state is the step number.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from opt import storage
from opt.data.manifest import DatasetError, DatasetManifest


def open_tokens(manifest: DatasetManifest, rel: str, cache_dir: str | Path, verify: bool = True) -> np.ndarray:
    """Memory-map a token file of the dataset (downloading it first when the store is S3)."""
    meta = manifest.files.get(rel)
    if meta is None:
        raise DatasetError(f"{manifest.uri}: manifest lists no {rel}")
    path = storage.local_path(manifest.file_uri(rel), cache_dir)
    if path.stat().st_size != meta["size"] or (verify and storage.sha256_file(path) != meta["sha256"]):
        raise DatasetError(f"{path}: size or sha256 differs from the manifest; the dataset is corrupted, re-run data prep")
    if meta["size"] == 0:
        return np.zeros(0, dtype=manifest.token_dtype)
    return np.memmap(path, dtype=manifest.token_dtype, mode="r")


class TrainBatches:
    """Non-overlapping windows of seq_len + 1 tokens, shuffled per epoch, split across ranks."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, rank: int, world: int, seed: int) -> None:
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < micro_batch * world:
            raise DatasetError(
                f"the training split has {self.n_windows} windows of {seq_len} tokens, fewer than one global batch "
                f"({micro_batch} x {world} ranks); lower data.seq_len or train.micro_batch_size"
            )
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _window(self, i: int) -> int:
        epoch, pos = divmod(i, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro_batch, seq_len), for this rank at `step`."""
        first = (step * self.world + self.rank) * self.micro_batch
        rows = []
        for i in range(first, first + self.micro_batch):
            start = self._window(i) * self.seq_len
            rows.append(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        block = torch.from_numpy(np.stack(rows))
        return block[:, :-1], block[:, 1:]


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
