"""Streaming readers: every bad-input kind becomes a Rejected with the right line; nothing raises on bad data."""

from __future__ import annotations

import gzip
import io
import json
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from opt import storage
from opt.data import readers
from opt.data.readers import LineFault, iter_lines, list_source_files, read_pile, read_text
from opt.data.sources import Document, Rejected, SourceError


def compress(path: Path, data: bytes) -> Path:
    """Write `data` to `path`, compressed by its suffix."""
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor(level=3).compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def summary(items: list[Document | Rejected]) -> list[tuple[int, str]]:
    """(line, doc_id or reason) per item: compact enough to compare whole files exactly."""
    return [(i.line, f"doc:{i.doc_id}" if isinstance(i, Document) else i.reason) for i in items]


def numbered(n: int) -> bytes:
    """n distinct, poorly compressible JSONL records (so a compressed file spans many blocks)."""
    return b"".join(json.dumps({"text": f"doc {i} {os.urandom(24).hex()}", "id": i}).encode() + b"\n" for i in range(n))


class GeneratorFile(io.RawIOBase):
    """A file object fed by a generator: it fails the test on any read of "everything" and records sizes."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks, self._buf = chunks, b""
        self.reads: list[int] = []
        self.served = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        self.reads.append(-1 if n is None else n)
        assert n is not None and n >= 0, "the reader asked for the whole input"
        while len(self._buf) < n:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                break
        out, self._buf = self._buf[:n], self._buf[n:]
        self.served += len(out)
        return out

    def readall(self) -> bytes:
        raise AssertionError("the reader asked for the whole input")


# --- Pile JSONL ----------------------------------------------------------------------------------

BAD_AND_GOOD = [
    json.dumps({"text": "first document", "meta": {"pile_set_name": "Pile-CC", "id": "m1"}}).encode(),  # 1
    b"",  # 2: blank lines are not records
    b'{"text": "broken',  # 3
    b'{"text": "caf\xe9 latin-1"}',  # 4: not UTF-8
    json.dumps({"meta": {"id": "x"}}).encode(),  # 5: no text
    json.dumps({"text": 42}).encode(),  # 6: text not a string
    b'["a", "list"]',  # 7: valid JSON, not a record
    json.dumps({"text": " \n\t "}).encode(),  # 8
    json.dumps({"text": "y" * 101}).encode(),  # 9: over max_chars=100
    json.dumps({"text": "top-level id", "id": 7}).encode(),  # 10
    b"[" * 100_000,  # 11: nests past the interpreter's recursion limit
    json.dumps({"text": "last, no trailing newline"}).encode(),  # 12
]
EXPECTED = [
    (1, "doc:m1"),
    (3, "invalid_json"),
    (4, "invalid_utf8"),
    (5, "missing_text"),
    (6, "missing_text"),
    (7, "missing_text"),
    (8, "empty"),
    (9, "gigantic"),
    (10, "doc:7"),
    (11, "invalid_json"),
    (12, "doc:None"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_read_pile_rejects_every_bad_kind_at_its_line(tmp_path: Path, suffix: str) -> None:
    path = compress(tmp_path / f"part{suffix}", b"\n".join(BAD_AND_GOOD))

    items = list(read_pile("pile-cc", str(path), max_chars=100))

    assert summary(items) == EXPECTED
    assert all(i.source == "pile-cc" and i.file == str(path) for i in items)
    first = items[0]
    assert isinstance(first, Document) and first.text == "first document"
    utf8 = items[2]
    assert isinstance(utf8, Rejected) and utf8.excerpt == '{"text": "caf\ufffd latin-1"}'
    gigantic = items[7]
    assert isinstance(gigantic, Rejected) and gigantic.excerpt == "y" * 101


def test_excerpt_is_the_first_200_characters(tmp_path: Path) -> None:
    path = compress(tmp_path / "a.jsonl", b'{"text": "' + "é".encode() * 500 + b"\n")

    (item,) = read_pile("s", str(path), max_chars=100)

    assert isinstance(item, Rejected) and item.reason == "invalid_json"
    assert item.excerpt == '{"text": "' + "é" * 190


def test_lone_surrogates_are_replaced_so_the_text_encodes(tmp_path: Path) -> None:
    path = compress(tmp_path / "a.jsonl", b'{"text": "half an emoji \\ud83d here, a whole one \\ud83d\\ude00"}\n')

    (doc,) = read_pile("s", str(path), max_chars=100)

    assert isinstance(doc, Document)
    assert doc.text == "half an emoji \ufffd here, a whole one \U0001f600"
    doc.text.encode("utf-8")


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_stream_keeps_earlier_lines_and_rejects_once_where_it_broke(tmp_path: Path, suffix: str) -> None:
    data = numbered(3000)
    whole = compress(tmp_path / f"whole{suffix}", data)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])

    items = list(read_pile("s", str(cut), max_chars=1000))

    *docs, last = items
    assert docs and all(isinstance(d, Document) for d in docs)
    assert [d.line for d in docs] == list(range(1, len(docs) + 1))  # nothing skipped before the break
    assert [d.doc_id for d in docs if isinstance(d, Document)] == [str(i) for i in range(len(docs))]
    assert isinstance(last, Rejected) and last.reason == "corrupt_stream" and last.line == len(docs) + 1
    assert len(docs) < 3000


@pytest.mark.parametrize("content", [b"", b"this is not zstd at all\n"])
def test_empty_or_garbage_zst_is_one_corrupt_stream(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(content)

    assert summary(list(read_pile("s", str(path), max_chars=100))) == [(1, "corrupt_stream")]


def test_zst_with_several_frames_and_a_pushshift_sized_window(tmp_path: Path) -> None:
    # PushShift compresses with --long=31: a 2 GiB window the library refuses by default.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(numbered(10))
    second = zstandard.ZstdCompressor().compress(numbered(5))
    path = tmp_path / "RC_2019-01.json.zst"
    path.write_bytes(buf.getvalue() + second)
    assert zstandard.get_frame_parameters(buf.getvalue()).window_size == 2**31

    lines = list(iter_lines(str(path)))

    assert [n for n, _ in lines] == list(range(1, 16))
    assert all(isinstance(b, bytes) for _, b in lines)


def test_overlong_line_is_skipped_and_reading_goes_on(tmp_path: Path) -> None:
    data = b'{"text": "a"}\n{"text": "' + b"z" * 5000 + b'"}\n{"text": "b"}\n{"text": "' + b"q" * 5000
    path = compress(tmp_path / "a.jsonl.zst", data)

    items = list(read_pile("s", str(path), max_chars=10_000, max_line_bytes=1000))

    assert summary(items) == [(1, "doc:None"), (2, "gigantic_record"), (3, "doc:None"), (4, "gigantic_record")]
    assert isinstance(items[1], Rejected) and items[1].excerpt.startswith('{"text": "zzz')


def test_overlong_line_is_never_held_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 24 MiB line with a 1 MiB limit: peak Python memory stays a few MiB, and no read asks for everything."""
    total = 24 << 20

    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(total // (64 << 10)):
            yield b"x" * (64 << 10)
        yield b'"}\n{"text": "after"}\n'

    fake = GeneratorFile(chunks())
    monkeypatch.setattr(readers, "open_binary_stream", lambda uri: fake)
    tracemalloc.start()
    try:
        lines = list(iter_lines("generated.jsonl", max_line_bytes=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert [(n, p.reason if isinstance(p, LineFault) else p) for n, p in lines] == [(1, "gigantic_record"), (2, b'{"text": "after"}')]
    assert peak < 8 << 20
    assert fake.served > total and max(fake.reads) <= readers.CHUNK


def test_missing_file_is_a_source_error_naming_source_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SourceError, match=rf"'pile-cc'.*{missing.name}"):
        list(read_pile("pile-cc", str(missing), max_chars=10))


# --- text files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz", ".txt.zst"])
def test_read_text_one_document_per_file(tmp_path: Path, suffix: str) -> None:
    path = compress(tmp_path / f"book{suffix}", "\ufeffChapter 1\n\nIt was a dark night.\n".encode())

    assert list(read_text("books", str(path), max_chars=1000)) == [Document("books", str(path), 1, "Chapter 1\n\nIt was a dark night.\n")]


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"  \n\n ", "empty"), (b"caf\xe9", "invalid_utf8"), ("é".encode() * 101, "gigantic"), (b"x" * 401, "gigantic")],
)
def test_read_text_rejects(tmp_path: Path, content: bytes, reason: str) -> None:
    path = compress(tmp_path / "a.txt", content)

    assert summary(list(read_text("t", str(path), max_chars=100))) == [(1, reason)]


def test_read_text_truncated_zst_is_corrupt_stream(tmp_path: Path) -> None:
    whole = compress(tmp_path / "w.txt.zst", numbered(500))
    cut = tmp_path / "c.txt.zst"
    cut.write_bytes(whole.read_bytes()[:-20])

    assert summary(list(read_text("t", str(cut), max_chars=10**6))) == [(1, "corrupt_stream")]


def test_read_text_stops_reading_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = GeneratorFile(b"y" * (64 << 10) for _ in range(1000))  # 64 MiB if read to the end
    monkeypatch.setattr(readers, "open_binary_stream", lambda uri: fake)

    assert summary(list(read_text("t", "huge.txt", max_chars=1000))) == [(1, "gigantic")]
    assert fake.served <= 2 * readers.CHUNK


# --- listing -------------------------------------------------------------------------------------


def test_list_source_files_filters_by_kind_and_sorts(tmp_path: Path) -> None:
    names = [
        "b.jsonl",
        "a.jsonl.zst",
        "c.json.zst",
        "d.jsonl.gz",
        "RC_2019-02.zst",
        "RS_2019-01.zst",
        "x.ndjson",
        "e.txt",
        "f.txt.gz",
        "notes.md",
    ]
    for name in names:
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / name).write_bytes(b"")
    base = str(tmp_path / "sub")

    def listed(kind: str) -> list[str]:
        return [Path(f).name for f in list_source_files(kind, base)]

    assert listed("pile") == ["a.jsonl.zst", "b.jsonl", "c.json.zst", "d.jsonl.gz"]
    assert listed("jsonl") == listed("pile")
    assert listed("reddit") == [
        "RC_2019-02.zst",
        "RS_2019-01.zst",
        "a.jsonl.zst",
        "b.jsonl",
        "c.json.zst",
        "d.jsonl.gz",
        "f.txt.gz",
        "x.ndjson",
    ]
    assert listed("text") == ["e.txt", "f.txt.gz"]
    assert list_source_files("pile", f"{base}/b.jsonl") == [f"{base}/b.jsonl"]


def test_list_source_files_errors(tmp_path: Path) -> None:
    (tmp_path / "only.md").write_text("x")
    with pytest.raises(SourceError, match=rf"'pile-cc'.*{tmp_path}"):
        list_source_files("pile", str(tmp_path), source="pile-cc")
    with pytest.raises(SourceError, match="'text'"):
        list_source_files("text", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown source kind"):
        list_source_files("parquet", str(tmp_path))


# --- S3 ------------------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3_buckets) -> str:
    return s3_buckets("readers")


def test_s3_jsonl_zst_streams_through_boto3(bucket: str) -> None:
    data = numbered(2000)
    comp = zstandard.ZstdCompressor().compress(data)
    storage.write_bytes(f"{bucket}/pile/00.jsonl.zst", comp)
    storage.write_bytes(f"{bucket}/pile/01.jsonl.zst", comp[: len(comp) // 2])
    storage.write_bytes(f"{bucket}/pile/README.md", b"not data")

    files = list_source_files("pile", f"{bucket}/pile")
    assert files == [f"{bucket}/pile/00.jsonl.zst", f"{bucket}/pile/01.jsonl.zst"]
    assert list_source_files("pile", files[0]) == files[:1]

    whole = list(read_pile("pile-cc", files[0], max_chars=1000))
    assert len(whole) == 2000 and [d.doc_id for d in whole if isinstance(d, Document)] == [str(i) for i in range(2000)]
    *docs, last = read_pile("pile-cc", files[1], max_chars=1000)
    assert isinstance(last, Rejected) and last.reason == "corrupt_stream" and last.line == len(docs) + 1

    with pytest.raises(SourceError, match="01.jsonl.gz"):
        list(read_pile("pile-cc", f"{bucket}/pile/01.jsonl.gz", max_chars=10))


class _FlakyBody:
    """A response body whose connection drops once after `fail_at` bytes."""

    def __init__(self, data: bytes, fail_at: int | None) -> None:
        self._data, self._pos, self._fail_at = data, 0, fail_at

    def read(self, n: int) -> bytes:
        if self._fail_at is not None and self._pos >= self._fail_at:
            raise ConnectionResetError("connection reset by peer")
        out = self._data[self._pos : self._pos + min(n, 16 << 10)]  # a socket hands over what has arrived
        self._pos += len(out)
        return out

    def close(self) -> None:
        pass


class _FakeS3:
    """Hand-written stand-in for the boto3 client: serves one object, drops the first connection mid-way."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        self.data, self.fail_at = data, fail_at
        self.calls: list[dict[str, Any]] = []

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        start = int(kwargs["Range"].removeprefix("bytes=").rstrip("-")) if "Range" in kwargs else 0
        fail_at = self.fail_at if len(self.calls) == 1 else None
        return {"Body": _FlakyBody(self.data[start:], fail_at), "ETag": '"v1"', "ContentLength": len(self.data) - start}


def test_s3_stream_resumes_a_dropped_connection_at_the_byte_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    data = numbered(3000)
    comp = zstandard.ZstdCompressor().compress(data)
    fake = _FakeS3(comp, fail_at=len(comp) // 2)
    monkeypatch.setattr(storage, "s3_client", lambda: fake)
    monkeypatch.setattr(readers, "S3_RETRY_BACKOFF_S", 0.0)

    lines = [line for _, line in iter_lines("s3://b/k.jsonl.zst") if isinstance(line, bytes)]

    assert b"\n".join(lines) + b"\n" == data
    assert len(fake.calls) == 2
    assert fake.calls[1]["IfMatch"] == '"v1"' and fake.calls[1]["Range"].startswith("bytes=")


def test_s3_stream_that_keeps_failing_is_a_source_error_not_a_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    # A network that stays down is an environment problem for the task's retry, not bad data for quarantine.
    fake = _FakeS3(zstandard.ZstdCompressor().compress(numbered(3000)), fail_at=0)
    fake.get_object = lambda **kw: {"Body": _FlakyBody(b"", 0), "ETag": '"v1"', "ContentLength": 10}  # type: ignore[method-assign]
    monkeypatch.setattr(storage, "s3_client", lambda: fake)
    monkeypatch.setattr(readers, "S3_RETRY_BACKOFF_S", 0.0)

    with pytest.raises(SourceError, match=r"'pile-cc'.*s3://b/k.jsonl.zst.*after 3 retries"):
        list(read_pile("pile-cc", "s3://b/k.jsonl.zst", max_chars=10))
