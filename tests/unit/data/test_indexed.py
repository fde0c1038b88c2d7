from __future__ import annotations

import pickle
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from opt.data.indexed import IndexedDataset, IndexedDatasetWriter, IndexedFormatError, pack_documents

# documents of ragged sequences, an empty sequence included; values at the edges of each dtype
DOCS_U16 = [[[0, 1, 2], [65535]], [[7] * 5], [[], [3, 4]]]
DOCS_I32 = [[[-(2**31), 1, 2], [2**31 - 1]], [[7] * 5], [[], [-3, 4]]]


def write_docs(prefix: Path, docs: list[list[list[int]]], dtype: type[np.integer]) -> tuple[Path, Path]:
    with IndexedDatasetWriter(prefix, dtype=dtype) as w:
        for doc in docs:
            for seq in doc:
                w.add_sequence(seq)
            w.end_document()
    return w.bin_path, w.idx_path


def parse_megatron_idx(idx: bytes) -> dict:
    """Independent reader straight from the MMIDIDX spec (megatron/core/datasets/indexed_dataset.py)."""
    magic = idx[:9]
    (version,) = struct.unpack_from("<Q", idx, 9)
    (code,) = struct.unpack_from("<B", idx, 17)
    n, d = struct.unpack_from("<QQ", idx, 18)
    off = 34
    sizes = np.frombuffer(idx, dtype="<i4", count=n, offset=off)
    pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=off + 4 * n)
    doc_idx = np.frombuffer(idx, dtype="<i8", count=d, offset=off + 12 * n)
    assert len(idx) == off + 12 * n + 8 * d  # nothing trailing
    return {"magic": magic, "version": version, "code": code, "n": n, "d": d, "sizes": sizes, "pointers": pointers, "doc_idx": doc_idx}


@pytest.mark.parametrize(("dtype", "docs"), [(np.uint16, DOCS_U16), (np.int32, DOCS_I32)])
def test_round_trip_ragged_sequences_and_documents(tmp_path, dtype, docs):
    write_docs(tmp_path / "shard", docs, dtype)
    seqs = [s for doc in docs for s in doc]
    ds = IndexedDataset(tmp_path / "shard")
    assert len(ds) == len(seqs) == 5
    assert ds.dtype == np.dtype(dtype)
    for i, seq in enumerate(seqs):
        assert ds[i].tolist() == seq
        assert ds[i].dtype == np.dtype(dtype)
    assert ds[-1].tolist() == seqs[-1]
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds[-6]
    assert ds.sizes.tolist() == [3, 1, 5, 0, 2]
    itemsize = np.dtype(dtype).itemsize
    assert ds.pointers.tolist() == [0, 3 * itemsize, 4 * itemsize, 9 * itemsize, 9 * itemsize]
    assert ds.document_indices.tolist() == [0, 2, 3, 5]
    assert ds.get(2, offset=1, length=3).tolist() == [7, 7, 7]
    assert ds.get(0, offset=1).tolist() == seqs[0][1:]
    with pytest.raises(ValueError, match="outside sequence"):
        ds.get(0, offset=2, length=2)
    flat = [t for s in seqs for t in s]
    assert ds.num_tokens == len(flat) == 11
    assert isinstance(ds.tokens(), np.memmap) and ds.tokens().tolist() == flat
    assert pickle.loads(pickle.dumps(ds))[4].tolist() == seqs[4]  # reopened by path, not copied


@pytest.mark.parametrize(("dtype", "code", "docs"), [(np.uint16, 8, DOCS_U16), (np.int32, 4, DOCS_I32)])
def test_idx_bytes_match_the_megatron_layout(tmp_path, dtype, code, docs):
    bin_path, idx_path = write_docs(tmp_path / "shard", docs, dtype)
    idx = parse_megatron_idx(idx_path.read_bytes())
    seqs = [s for doc in docs for s in doc]
    assert idx["magic"] == b"MMIDIDX\x00\x00"
    assert idx["version"] == 1
    assert idx["code"] == code
    assert idx["n"] == 5
    assert idx["d"] == 4  # three documents + the leading 0
    assert idx["sizes"].tolist() == [len(s) for s in seqs]
    itemsize = np.dtype(dtype).itemsize
    assert idx["pointers"].tolist() == (np.cumsum([0] + [len(s) for s in seqs[:-1]]) * itemsize).tolist()
    assert idx["doc_idx"].tolist() == [0, 2, 3, 5]
    raw = np.frombuffer(bin_path.read_bytes(), dtype=np.dtype(dtype).newbyteorder("<"))
    assert raw.tolist() == [t for s in seqs for t in s]
    for size, ptr, seq in zip(idx["sizes"], idx["pointers"], seqs, strict=True):
        assert raw[ptr // itemsize : ptr // itemsize + size].tolist() == seq


def test_empty_dataset_round_trips(tmp_path):
    with IndexedDatasetWriter(tmp_path / "empty"):
        pass
    idx = parse_megatron_idx((tmp_path / "empty.idx").read_bytes())
    assert (idx["n"], idx["d"], idx["doc_idx"].tolist()) == (0, 1, [0])
    ds = IndexedDataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.tokens().size == 0


def test_unclosed_trailing_sequences_become_a_document(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "s")
    w.add_document([1, 2])
    w.add_sequence([3])
    w.finalize()
    assert IndexedDataset(tmp_path / "s").document_indices.tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError, match="finalized"):
        w.add_sequence([4])


def test_pack_documents_cuts_the_eos_joined_stream_into_seq_len_sequences(tmp_path):
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [], np.array([10, 11], dtype=np.int64)]
    with IndexedDatasetWriter(tmp_path / "packed") as w:
        stats = pack_documents(docs, seq_len=4, eos_id=0, writer=w)
    stream = [1, 2, 3, 0, 4, 0, 5, 6, 7, 8, 9, 0, 0, 10, 11, 0]
    assert stats == {"documents": 5, "sequences": 4, "tokens": 16}
    ds = IndexedDataset(tmp_path / "packed")
    assert ds.sizes.tolist() == [4, 4, 4, 4]  # an exact multiple leaves no empty tail
    assert ds.tokens().tolist() == stream
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]  # every sequence is its own document

    with IndexedDatasetWriter(tmp_path / "tail") as w:
        stats = pack_documents(docs[:3], seq_len=5, eos_id=9, writer=w)
    ds = IndexedDataset(tmp_path / "tail")
    assert ds.sizes.tolist() == [5, 5, 2]  # the shorter remainder is kept
    assert ds.tokens().tolist() == [1, 2, 3, 9, 4, 9, 5, 6, 7, 8, 9, 9]
    assert stats == {"documents": 3, "sequences": 3, "tokens": 12}


def test_pack_documents_rejects_bad_arguments(tmp_path):
    with IndexedDatasetWriter(tmp_path / "p") as w:
        with pytest.raises(ValueError, match="seq_len"):
            pack_documents([[1]], seq_len=0, eos_id=0, writer=w)
        with pytest.raises(ValueError, match="does not fit uint16"):
            pack_documents([[1]], seq_len=4, eos_id=70000, writer=w)


def test_truncated_or_extended_bin_is_rejected_at_open(tmp_path):
    bin_path, _ = write_docs(tmp_path / "shard", DOCS_U16, np.uint16)
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-2])
    with pytest.raises(ValueError, match=r"shard\.bin: 20 bytes, but the index ends its last sequence at byte 22"):
        IndexedDataset(tmp_path / "shard")
    bin_path.write_bytes(data + b"\x00\x00")
    with pytest.raises(ValueError, match="truncated or does not belong"):
        IndexedDataset(tmp_path / "shard")


def test_corrupt_or_truncated_idx_is_rejected_at_open(tmp_path):
    _, idx_path = write_docs(tmp_path / "shard", DOCS_U16, np.uint16)
    good = idx_path.read_bytes()
    idx_path.write_bytes(b"TNTIDX\x00\x00\x00" + good[9:])
    with pytest.raises(IndexedFormatError, match="magic"):
        IndexedDataset(tmp_path / "shard")
    idx_path.write_bytes(good[:-8])
    with pytest.raises(ValueError, match="index is truncated"):
        IndexedDataset(tmp_path / "shard")
    idx_path.write_bytes(good[:20])
    with pytest.raises(ValueError, match="shorter than the 34-byte"):
        IndexedDataset(tmp_path / "shard")
    idx_path.write_bytes(good[:17] + bytes([99]) + good[18:])
    with pytest.raises(ValueError, match="unknown dtype code 99"):
        IndexedDataset(tmp_path / "shard")


def test_tokens_that_do_not_fit_the_dtype_are_rejected(tmp_path):
    with IndexedDatasetWriter(tmp_path / "s", dtype=np.uint16) as w:
        for bad in ([1, 70000], [-1, 2], np.array([65536], dtype=np.int64)):
            with pytest.raises(ValueError, match="does not fit uint16"):
                w.add_sequence(bad)
        with pytest.raises(ValueError, match="integers"):
            w.add_sequence([1.5])
        with pytest.raises(ValueError, match="1-D"):
            w.add_sequence([[1, 2]])
        w.add_document([65535])
    assert IndexedDataset(tmp_path / "s").tokens().tolist() == [65535]  # rejected calls wrote nothing
    with pytest.raises(ValueError, match="integer types"):
        IndexedDatasetWriter(tmp_path / "f", dtype=np.float32)


def test_exception_in_context_manager_leaves_no_files(tmp_path):
    with pytest.raises(KeyError), IndexedDatasetWriter(tmp_path / "shard") as w:
        w.add_document([1, 2, 3])
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_the_pair_and_leaves_no_temp_files(tmp_path):
    write_docs(tmp_path / "shard", DOCS_U16, np.uint16)
    with IndexedDatasetWriter(tmp_path / "shard", dtype=np.int32) as w:
        w.add_document([5, 6])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin", "shard.idx"]
    ds = IndexedDataset(tmp_path / "shard")
    assert ds.dtype == np.int32 and ds.tokens().tolist() == [5, 6]


def test_a_million_tokens_stream_through_bounded_memory(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 2000, size=1000)

    def docs() -> Iterator[np.ndarray]:  # generated lazily: the whole corpus never exists in memory
        start = 0
        for n in lengths:
            yield np.arange(start, start + n, dtype=np.int64) % 50000
            start += n

    tracemalloc.start()
    try:
        with IndexedDatasetWriter(tmp_path / "big") as w:
            stats = pack_documents(docs(), seq_len=2048, eos_id=50001, writer=w)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = int(lengths.sum()) + len(lengths)
    assert total > 1_000_000 and stats["tokens"] == total
    assert peak < 500_000  # far below 2 MB of uint16 tokens, let alone a Python list of them

    ds = IndexedDataset(tmp_path / "big")
    assert ds.num_tokens == total and len(ds) == stats["sequences"] == -(-total // 2048)
    assert (ds.sizes[:-1] == 2048).all()
    flat = ds.tokens()
    expected = np.concatenate([np.append(d, 50001) for d in docs()]).astype(np.uint16)
    assert np.array_equal(flat, expected)
