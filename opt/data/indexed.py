"""Megatron-LM-compatible indexed token datasets: a `.bin` of raw tokens plus an `.idx` ("MMIDIDX").

The layout follows Megatron-Core's `megatron/core/datasets/indexed_dataset.py` (`_IndexWriter.write`,
`_IndexReader`, `IndexedDatasetBuilder`), so shards written here open in Megatron-LM, NeMo and
GPT-NeoX. The `.idx`, all little-endian, no padding:

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          <Q        1
    dtype code       <B        DTYPE_CODES key of the token dtype
    sequence count   <Q        N
    document count   <Q        D = documents + 1 (document_indices starts with 0)
    sizes            int32[N]  tokens per sequence
    pointers         int64[N]  byte offset of each sequence in the .bin
    document_indices int64[D]  sequence index where each document ends; [0] first

The `.bin` is the sequences' tokens back to back, so it is also one flat token stream.
"""

from __future__ import annotations

import operator
import os
import secrets
import struct
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from opt.data.manifest import DatasetError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document count: 9 + 8 + 1 + 8 + 8 = 34 bytes
_HEADER = struct.Struct("<9sQBQQ")

# Megatron-Core's `DType` enum. The legacy `dtypes` dict (megatron/data/indexed_dataset.py) agrees on
# the integer codes 1-5 and 8 but maps 6 and 7 to np.float and np.double (both float64); token
# datasets only ever use the integer codes, where every Megatron version agrees.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
_MAX_SEQUENCE = np.iinfo(np.int32).max  # sizes are stored as int32


class IndexedFormatError(DatasetError, ValueError):
    """An `.idx`/`.bin` pair that is not a well-formed MMIDIDX dataset (truncated, corrupt, foreign)."""


def _paths(prefix: str | Path) -> tuple[Path, Path]:
    # appended, not with_suffix: prefixes like "shard.000" keep their dots
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def _as_tokens(tokens: Sequence[int] | npt.ArrayLike, dtype: np.dtype[Any]) -> np.ndarray:
    """`tokens` as a contiguous 1-D array of `dtype`; ValueError if it is not integers that fit."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=dtype)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.dtype != dtype:
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ValueError(
                f"token id {bad} does not fit {dtype.name} (range {info.min}..{info.max}); write the dataset with a wider dtype"
            )
    return np.ascontiguousarray(arr, dtype=dtype)


class IndexedDatasetWriter:
    """Streams sequences into `<prefix>.bin` and writes `<prefix>.idx` at `finalize()`.

    Tokens go to disk as they arrive; only 4 bytes per sequence (its size) and 8 per document stay in
    memory. Both files are written under temporary names in the target directory and renamed at
    `finalize()`, `.idx` last, so an interrupted write never leaves a pair that looks complete.
    """

    def __init__(self, prefix: str | Path, dtype: npt.DTypeLike = np.uint16) -> None:
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        if self.dtype not in _CODE_OF or self.dtype.kind not in "iu":
            raise ValueError(f"token dtype must be one of the integer types {sorted({t.__name__ for t in DTYPE_CODES.values()})}")
        self.bin_path, self.idx_path = _paths(prefix)
        # the random part keeps concurrent writers of one prefix from sharing a temp file
        tag = f"tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._bin_tmp = self.bin_path.with_name(f"{self.bin_path.name}.{tag}")
        self._idx_tmp = self.idx_path.with_name(f"{self.idx_path.name}.{tag}")
        self._bin: BinaryIO | None = open(self._bin_tmp, "xb")  # noqa: SIM115 - closed by finalize/abort
        self._sizes = array("i")  # int32, like the index
        self._document_indices = array("q", [0])  # int64; Megatron starts the list with 0
        self._num_tokens = 0

    @property
    def num_sequences(self) -> int:
        """Sequences written so far."""
        return len(self._sizes)

    @property
    def num_tokens(self) -> int:
        """Tokens written so far."""
        return self._num_tokens

    def _file(self) -> BinaryIO:
        if self._bin is None:
            raise RuntimeError(f"{self.bin_path}: the writer is already finalized or aborted")
        return self._bin

    def add_sequence(self, tokens: Sequence[int] | npt.ArrayLike) -> None:
        """Append one sequence (1-D integers that fit the dtype) to the current document."""
        f = self._file()
        arr = _as_tokens(tokens, self.dtype)
        if arr.size > _MAX_SEQUENCE:
            raise ValueError(f"a sequence holds at most {_MAX_SEQUENCE} tokens (int32 sizes), got {arr.size}")
        f.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).data.cast("B"))  # no copy on little-endian hosts
        self._sizes.append(arr.size)
        self._num_tokens += arr.size

    def end_document(self) -> None:
        """Close the current document: it ends after the last sequence added."""
        self._file()
        self._document_indices.append(len(self._sizes))

    def add_document(self, tokens: Sequence[int] | npt.ArrayLike) -> None:
        """Append `tokens` as one sequence that is a whole document."""
        self.add_sequence(tokens)
        self.end_document()

    def finalize(self) -> tuple[Path, Path]:
        """Write the index, move both files into place and return (bin_path, idx_path).

        Sequences added since the last `end_document()` become a final document, so no sequence is
        left outside every document (Megatron's GPTDataset would never sample it).
        """
        f = self._file()
        try:
            if self._document_indices[-1] != len(self._sizes):
                self._document_indices.append(len(self._sizes))
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._bin = None
            self._write_index()
            # a stale .idx from an earlier run must not pair with the new .bin, even for an instant
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)
            _fsync_dir(self.bin_path.parent)
        except BaseException:
            self.abort()
            raise
        return self.bin_path, self.idx_path

    def _write_index(self) -> None:
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if self._sizes else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        docs = np.frombuffer(self._document_indices, dtype=np.int64)
        with open(self._idx_tmp, "xb") as idx:
            idx.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(sizes), len(docs)))
            idx.write(sizes.astype("<i4", copy=False).tobytes())
            idx.write(pointers.astype("<i8", copy=False).tobytes())
            idx.write(docs.astype("<i8", copy=False).tobytes())
            idx.flush()
            os.fsync(idx.fileno())

    def abort(self) -> None:
        """Close and delete the temporary files; the final paths are left as they were."""
        if self._bin is not None:
            self._bin.close()
            self._bin = None
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif self._bin is not None:
            self.finalize()


def _fsync_dir(path: Path) -> None:
    """Persist renames in `path` (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class IndexedDataset:
    """Read-only, memory-mapped view of an MMIDIDX `.bin`/`.idx` pair.

    Opening validates the header and that the `.bin` is exactly as long as the index says, so a
    truncated or mismatched shard fails here with `IndexedFormatError` (a ValueError) instead of
    yielding garbage tokens later.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = _paths(prefix)
        idx_size = self.idx_path.stat().st_size
        if idx_size < _HEADER.size:
            raise IndexedFormatError(f"{self.idx_path}: {idx_size} bytes, shorter than the {_HEADER.size}-byte MMIDIDX header")
        with open(self.idx_path, "rb") as f:
            magic, version, code, n, d = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise IndexedFormatError(f"{self.idx_path}: magic {magic!r} is not {MAGIC!r}; not a Megatron MMIDIDX index")
        if version != VERSION:
            raise IndexedFormatError(f"{self.idx_path}: index version {version}, only {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise IndexedFormatError(f"{self.idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self._dtype: np.dtype[Any] = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
        expected = _HEADER.size + 4 * n + 8 * n + 8 * d
        if idx_size != expected:
            raise IndexedFormatError(
                f"{self.idx_path}: {idx_size} bytes, but {n} sequences and {d} document indices need {expected}; "
                "the index is truncated or corrupt"
            )

        self._idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        self._sizes = np.frombuffer(self._idx, dtype="<i4", count=n, offset=_HEADER.size)
        self._pointers = np.frombuffer(self._idx, dtype="<i8", count=n, offset=_HEADER.size + 4 * n)
        self._document_indices = np.frombuffer(self._idx, dtype="<i8", count=d, offset=_HEADER.size + 12 * n)
        if d == 0 or self._document_indices[0] != 0 or not 0 <= self._document_indices[-1] <= n:
            raise IndexedFormatError(f"{self.idx_path}: document_indices must start at 0 and end at most at {n} sequences")

        bin_size = self.bin_path.stat().st_size
        itemsize = self._dtype.itemsize
        want = int(self._pointers[-1]) + int(self._sizes[-1]) * itemsize if n else 0
        if bin_size != want:
            raise IndexedFormatError(
                f"{self.bin_path}: {bin_size} bytes, but the index ends its last sequence at byte {want}; "
                "the .bin is truncated or does not belong to this .idx"
            )
        if bin_size % itemsize:
            raise IndexedFormatError(f"{self.bin_path}: {bin_size} bytes is not a whole number of {self._dtype.name} tokens")
        # np.memmap cannot map an empty file
        self._bin: np.ndarray | None = np.memmap(self.bin_path, dtype=np.uint8, mode="r") if bin_size else None

    def __getstate__(self) -> dict[str, str]:
        # reopen by path: pickling the memmaps would copy the whole shard into every DataLoader worker
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, str]) -> None:
        IndexedDataset.__init__(self, state["prefix"])

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self._sizes)

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} with {n} sequences")
        i %= n
        return int(self._pointers[i]), int(self._sizes[i])

    def _read(self, pointer: int, count: int) -> np.ndarray:
        if count == 0 or self._bin is None:
            return np.zeros(0, dtype=self._dtype)
        return np.frombuffer(self._bin, dtype=self._dtype, count=count, offset=pointer)

    def __getitem__(self, i: int) -> np.ndarray:
        """Read-only view of sequence `i` (negative counts from the end)."""
        return self._read(*self._locate(i))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `i` (to its end when `length` is None)."""
        pointer, size = self._locate(i)
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"tokens {offset}:{offset + length} are outside sequence {i} of {size} tokens")
        return self._read(pointer + offset * self._dtype.itemsize, length)

    @property
    def sizes(self) -> np.ndarray:
        """int32[N]: tokens per sequence."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """int64[N]: byte offset of each sequence in the `.bin`."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64[documents + 1]: document k is sequences `document_indices[k] : document_indices[k + 1]`."""
        return self._document_indices

    @property
    def dtype(self) -> np.dtype[Any]:
        """Token dtype of the `.bin`."""
        return self._dtype

    @property
    def num_tokens(self) -> int:
        """Tokens in the `.bin`."""
        return 0 if self._bin is None else len(self._bin) // self._dtype.itemsize

    def tokens(self) -> np.ndarray:
        """The whole `.bin` as one flat, memory-mapped token array (sequences back to back)."""
        if self._bin is None:
            return np.zeros(0, dtype=self._dtype)
        return self._bin.view(self._dtype)


def pack_documents(
    docs: Iterable[Sequence[int] | npt.ArrayLike], seq_len: int, eos_id: int, writer: IndexedDatasetWriter
) -> dict[str, int]:
    """Write `docs`, each followed by `eos_id`, as one stream cut into `seq_len`-token sequences.

    Every sequence is its own Megatron document; the last may be shorter and is never dropped, so
    the `.bin` is exactly the concatenation of doc + eos for every doc. Memory stays at one
    `seq_len` buffer plus the current document. Returns {"documents", "sequences", "tokens"}.
    The writer is not finalized.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    eos = _as_tokens([eos_id], writer.dtype)[0]
    buf = np.empty(seq_len, dtype=writer.dtype)
    fill = n_docs = n_seqs = total = 0

    def emit(count: int) -> None:
        nonlocal n_seqs, total
        writer.add_document(buf[:count])
        n_seqs += 1
        total += count

    for doc in docs:
        arr = _as_tokens(doc, writer.dtype)
        n_docs += 1
        pos = 0
        while pos < arr.size:
            take = min(seq_len - fill, arr.size - pos)
            buf[fill : fill + take] = arr[pos : pos + take]
            fill, pos = fill + take, pos + take
            if fill == seq_len:
                emit(seq_len)
                fill = 0
        buf[fill] = eos
        fill += 1
        if fill == seq_len:
            emit(seq_len)
            fill = 0
    if fill:
        emit(fill)
    return {"documents": n_docs, "sequences": n_seqs, "tokens": total}
