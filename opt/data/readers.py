"""Streaming, bounded-memory readers for the data-prep stage.

Every reader yields `Document`s and `Rejected`s and never raises on bad input: a malformed line, a
line that is too long, or a compressed stream that breaks part-way all become a `Rejected` with the
source, file, line and reason, so quarantine accounts for every record. Only a file that cannot be
read at all (missing, permission, network failure after retries) raises `SourceError`: that is an
environment problem a retry can fix, not bad data.

Memory per open file is bounded by one decompressed chunk plus `max_line_bytes`; S3 objects are
streamed through boto3, never fetched whole.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from opt import storage
from opt.data.sources import Document, Rejected, SourceError
from opt.storage import StorageError

CHUNK = 1 << 20  # bytes per read from storage and per decompressed piece handed to the line splitter
MAX_LINE_BYTES = 64 << 20  # a JSONL record longer than this is skipped as `gigantic_record`
EXCERPT_CHARS = 200
ZSTD_MAX_WINDOW = 2**31  # PushShift dumps are compressed with --long=31; the library default (2**27) refuses them
# Compressed input is fed to zstd in small pieces: decompressobj() has no output limit, so the piece size
# bounds the output of one call (real text inflates ~10x; even an RLE bomb stays under 512 MiB per piece).
_ZSTD_PIECE = 16 << 10
S3_READ_RETRIES = 3
S3_RETRY_BACKOFF_S = 0.2

SUFFIXES: dict[str, tuple[str, ...]] = {
    "pile": (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.zst"),
    # PushShift: RC_/RS_ monthly dumps, .zst since 2018; older months shipped as .bz2 and .xz.
    "reddit": (".zst", ".jsonl", ".ndjson", ".gz", ".bz2", ".xz"),
    "text": (".txt", ".txt.gz", ".txt.zst"),
}
_KIND_ALIASES = {"jsonl": "pile"}  # SourceConfig.kind spells Pile-style input `jsonl`

# json.loads turns a lone "\ud83d" escape into a lone surrogate, which cannot be encoded as UTF-8 later
# (tokenizer, shard writer). Reddit dumps are full of half emoji; replace them rather than drop the record.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class LineFault:
    """Yielded by `iter_lines` in place of a line's bytes when the line cannot be read.

    `corrupt_stream`: the (compressed) stream broke here; it is the last item for the file.
    `gigantic_record`: the line exceeded `max_line_bytes` and was skipped; reading goes on.
    """

    reason: str
    detail: str
    excerpt: str


class _CorruptData(Exception):
    """Raised inside the decompression layer; `iter_lines` turns it into a `corrupt_stream` LineFault."""


def excerpt_of(data: bytes | str) -> str:
    """The first 200 characters of a record for quarantine, decoding bytes with replacement characters."""
    if isinstance(data, bytes):
        data = data[: EXCERPT_CHARS * 4].decode("utf-8", "replace")  # 4 bytes per char at most
    return data[:EXCERPT_CHARS]


def fix_surrogates(text: str) -> str:
    """Replace lone UTF-16 surrogates (from broken `\\uXXXX` escapes) with U+FFFD so the text encodes as UTF-8."""
    return _LONE_SURROGATE.sub("\ufffd", text)


# --- opening -------------------------------------------------------------------------------------


class _S3ObjectStream(io.RawIOBase):
    """A raw, forward-only stream over one S3 object's body.

    A connection that drops mid-object is reopened with a `Range` request from the byte reached,
    pinned to the first response's ETag (`IfMatch`), so a retry never splices two object versions.
    """

    def __init__(self, uri: str, client: Any) -> None:
        super().__init__()
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket or not key:
            raise StorageError(f"{uri}: an S3 object URI needs a bucket and a key: s3://bucket/key")
        self._uri, self._bucket, self._key, self._client = uri, bucket, key, client
        self._pos = 0
        try:
            resp = client.get_object(Bucket=bucket, Key=key)
        except Exception as e:  # botocore ClientError, EndpointConnectionError, ...
            raise StorageError(f"{uri}: open failed: {e}") from e
        self._etag: str | None = resp.get("ETag")
        self._size: int | None = resp.get("ContentLength")
        self._body: Any = resp["Body"]

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key, "Range": f"bytes={self._pos}-"}
        if self._etag:
            kwargs["IfMatch"] = self._etag
        self._body = self._client.get_object(**kwargs)["Body"]

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        last: Exception | None = None
        for attempt in range(S3_READ_RETRIES + 1):
            try:
                if self._body is None:
                    self._reopen()
                data = self._body.read(len(view))
                if not data and self._size is not None and self._pos < self._size:
                    raise StorageError(f"body ended at byte {self._pos} of {self._size}")
                break
            except Exception as e:  # urllib3/botocore streaming errors have no common base worth naming
                last = e
                self._close_body()
                if attempt < S3_READ_RETRIES:
                    time.sleep(S3_RETRY_BACKOFF_S * 2**attempt)
        else:
            raise StorageError(f"{self._uri}: read failed at byte {self._pos} after {S3_READ_RETRIES} retries: {last}") from last
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):  # the connection is already broken; nothing to release
                body.close()

    def close(self) -> None:
        self._close_body()
        super().close()


def open_binary_stream(uri: str) -> BinaryIO:
    """Open a local file or an S3 object for sequential binary reading (S3 is streamed, never fetched whole).

    Raises `StorageError` (an `OSError`) naming the URI when it cannot be opened.
    """
    if storage.is_s3(uri):
        return io.BufferedReader(_S3ObjectStream(uri, storage.s3_client()), buffer_size=CHUNK)
    try:
        return open(uri, "rb")
    except OSError as e:
        raise StorageError(f"{uri}: open failed: {e.strerror or e}") from e


class _RawSource:
    """The compressed bytes of one file: counts them, and reports any I/O failure as `StorageError`.

    The decompressors raise plain `OSError`/`EOFError` for corrupt data too (bz2, gzip); wrapping the
    source's own errors lets the caller tell "the disk or network failed" from "the data is bad".
    """

    def __init__(self, f: BinaryIO, uri: str) -> None:
        self._f, self._uri, self.count = f, uri, 0

    def read(self, n: int = CHUNK) -> bytes:
        if n < 0:
            n = CHUNK  # never slurp: decompressors that ask for "everything" get one chunk at a time
        try:
            data = self._f.read(n)
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"{self._uri}: read failed: {e.strerror or e}") from e
        self.count += len(data)
        return data


def _codec(uri: str) -> str:
    name = uri.lower()
    for suffix in (".zst", ".gz", ".bz2", ".xz"):
        if name.endswith(suffix):
            return suffix[1:]
    return "raw"


def _zstd_chunks(src: _RawSource) -> Iterator[bytes]:
    # Not stream_reader(): on a truncated frame it just reports EOF. decompressobj() exposes `.eof`, so
    # a file that ends inside a frame is detected; a new object per frame handles multi-frame files.
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    dobj = dctx.decompressobj()
    in_frame = False  # bytes of the current frame have been fed but its end not yet seen
    try:
        while raw := src.read(CHUNK):
            for start in range(0, len(raw), _ZSTD_PIECE):
                piece = raw[start : start + _ZSTD_PIECE]
                while piece:
                    in_frame = True
                    out = dobj.decompress(piece)
                    if out:
                        yield out
                    piece = b""
                    if dobj.eof:
                        piece, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
    except zstandard.ZstdError as e:
        raise _CorruptData(f"zstd: {e}") from e
    if src.count == 0:
        raise _CorruptData("empty file: not a zstd stream")
    if in_frame:
        raise _CorruptData("zstd: file ends inside a frame (truncated)")


def _open_stdlib_codec(src: _RawSource, codec: str) -> io.BufferedIOBase:
    fileobj = cast(BinaryIO, src)  # the decompressors only ever call .read(n)
    if codec == "gz":
        return gzip.GzipFile(fileobj=fileobj, mode="rb")
    if codec == "bz2":
        return bz2.BZ2File(fileobj)
    return lzma.LZMAFile(fileobj)


def _stdlib_chunks(src: _RawSource, codec: str) -> Iterator[bytes]:
    try:
        with _open_stdlib_codec(src, codec) as f:
            # read1: one decompression step per call, so what precedes a break is yielded before it raises
            while chunk := f.read1(CHUNK):
                yield chunk
    except StorageError:
        raise
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # BadGzipFile is an OSError; truncation is EOFError
        raise _CorruptData(f"{codec}: {e}") from e
    if src.count == 0:
        raise _CorruptData(f"empty file: not a {codec} stream")


def _decoded_chunks(src: _RawSource, codec: str) -> Iterator[bytes]:
    """Decompressed bytes in pieces; raises `_CorruptData` where the stream breaks, `StorageError` on I/O failure."""
    if codec == "zst":
        yield from _zstd_chunks(src)
    elif codec == "raw":
        while chunk := src.read(CHUNK):
            yield chunk
    else:
        yield from _stdlib_chunks(src, codec)


# --- lines ---------------------------------------------------------------------------------------


class _LineSplitter:
    """Splits a byte stream at b"\\n", holding at most `max_line_bytes` of an unfinished line."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.lineno = 0  # lines completed so far
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._skipping: str | None = None  # excerpt of a gigantic line being skipped

    def _head_bytes(self, extra: bytes = b"") -> bytes:
        # Only the first few hundred bytes: never join a whole (possibly huge) pending line for an excerpt.
        out, need = [], EXCERPT_CHARS * 4
        for piece in [*self._pending, extra]:
            out.append(piece[:need])
            need -= len(out[-1])
            if need <= 0:
                break
        return b"".join(out)

    def head(self) -> str:
        """Excerpt of the unfinished line (for a fault reported at it)."""
        if self._skipping is not None:
            return self._skipping
        return excerpt_of(self._head_bytes())

    def _gigantic(self) -> tuple[int, LineFault]:
        self.lineno += 1
        fault = LineFault("gigantic_record", f"line longer than {self.max_line_bytes} bytes", self._skipping or "")
        self._skipping = None
        return self.lineno, fault

    def _add_partial(self, part: bytes) -> None:
        if self._skipping is not None:
            return
        if self._pending_len + len(part) > self.max_line_bytes:
            # Over the limit: keep an excerpt, drop what was buffered, and discard the rest as it arrives.
            self._skipping = excerpt_of(self._head_bytes(part))
            self._pending, self._pending_len = [], 0
            return
        self._pending.append(part)
        self._pending_len += len(part)

    def _end_line(self, last: bytes) -> tuple[int, bytes | LineFault]:
        self._add_partial(last)
        if self._skipping is not None:
            return self._gigantic()
        line = b"".join(self._pending) if len(self._pending) != 1 else self._pending[0]
        self._pending, self._pending_len = [], 0
        self.lineno += 1
        return self.lineno, line

    def feed(self, chunk: bytes) -> Iterator[tuple[int, bytes | LineFault]]:
        parts = chunk.split(b"\n")
        for part in parts[:-1]:
            yield self._end_line(part)
        if parts[-1]:
            self._add_partial(parts[-1])

    def finish(self) -> Iterator[tuple[int, bytes | LineFault]]:
        """The final line when the stream does not end with a newline."""
        if self._pending or self._skipping is not None:
            yield self._end_line(b"")


def iter_lines(uri: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | LineFault]]:
    """Lines of a file (without the b"\\n"), numbered from 1, decompressed by suffix (.zst, .gz, .bz2, .xz).

    Blank lines are yielded too, so numbers match the file. Bad input never raises: a line over
    `max_line_bytes` yields `LineFault("gigantic_record")` (the line is discarded as it streams, never
    held whole) and reading goes on; a corrupt or truncated compressed stream yields
    `LineFault("corrupt_stream")` numbered at the line where it broke, and the file ends there.
    I/O failures (missing file, network down after retries) raise `StorageError`.
    """
    splitter = _LineSplitter(max_line_bytes)
    with open_binary_stream(uri) as f:
        try:
            for chunk in _decoded_chunks(_RawSource(f, uri), _codec(uri)):
                yield from splitter.feed(chunk)
        except _CorruptData as e:
            yield splitter.lineno + 1, LineFault("corrupt_stream", str(e), splitter.head())
            return
        yield from splitter.finish()


def _source_lines(source: str, uri: str, max_line_bytes: int) -> Iterator[tuple[int, bytes | LineFault]]:
    try:
        yield from iter_lines(uri, max_line_bytes)
    except OSError as e:
        raise SourceError(f"source {source!r}: cannot read {uri}: {e}") from e


# --- readers -------------------------------------------------------------------------------------


def _pile_record(source: str, uri: str, lineno: int, line: bytes, max_chars: int) -> Document | Rejected:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return Rejected(source, uri, lineno, "invalid_utf8", excerpt_of(line))
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; "[[[[..." nests past the stack
        return Rejected(source, uri, lineno, "invalid_json", excerpt_of(line))
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        return Rejected(source, uri, lineno, "missing_text", excerpt_of(line))
    if not text.strip():
        return Rejected(source, uri, lineno, "empty", excerpt_of(line))
    if len(text) > max_chars:
        return Rejected(source, uri, lineno, "gigantic", excerpt_of(text))
    meta = record.get("meta")
    doc_id = meta.get("id") if isinstance(meta, dict) else None
    if doc_id is None:
        doc_id = record.get("id")
    return Document(source, uri, lineno, fix_surrogates(text), str(doc_id) if doc_id is not None else None)


def read_pile(source: str, uri: str, max_chars: int, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Document | Rejected]:
    """Documents of a Pile-style JSONL file (`text`; id from `meta.id` or top-level `id`), streaming.

    Rejected reasons: `invalid_utf8`, `invalid_json`, `missing_text` (absent or not a string, or the
    line is not an object), `empty` (whitespace only), `gigantic` (more than `max_chars` characters),
    `gigantic_record` (line over `max_line_bytes`), `corrupt_stream`. Blank lines are skipped.
    Raises `SourceError` only if the file cannot be read at all.
    """
    for lineno, payload in _source_lines(source, uri, max_line_bytes):
        if isinstance(payload, LineFault):
            yield Rejected(source, uri, lineno, payload.reason, payload.excerpt)
        elif payload.strip():
            yield _pile_record(source, uri, lineno, payload, max_chars)


def read_text(source: str, uri: str, max_chars: int) -> Iterator[Document | Rejected]:
    """One document per text file (.txt, .txt.gz, .txt.zst), read as a stream with a size cap.

    A file that decompresses to more than `max_chars * 4` bytes is `gigantic` as soon as the cap is
    passed, without reading further. Other reasons: `invalid_utf8`, `empty`, `gigantic` (more than
    `max_chars` characters), `corrupt_stream`. A leading UTF-8 byte-order mark is dropped.
    """
    cap = max_chars * 4  # UTF-8 needs at most 4 bytes per character
    buf = bytearray()
    try:
        with open_binary_stream(uri) as f:
            for chunk in _decoded_chunks(_RawSource(f, uri), _codec(uri)):
                buf += chunk
                if len(buf) > cap:
                    yield Rejected(source, uri, 1, "gigantic", excerpt_of(bytes(buf[: EXCERPT_CHARS * 4])))
                    return
    except _CorruptData:
        yield Rejected(source, uri, 1, "corrupt_stream", excerpt_of(bytes(buf[: EXCERPT_CHARS * 4])))
        return
    except OSError as e:
        raise SourceError(f"source {source!r}: cannot read {uri}: {e}") from e
    try:
        text = buf.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        yield Rejected(source, uri, 1, "invalid_utf8", excerpt_of(bytes(buf[: EXCERPT_CHARS * 4])))
        return
    if not text.strip():
        yield Rejected(source, uri, 1, "empty", excerpt_of(text))
    elif len(text) > max_chars:
        yield Rejected(source, uri, 1, "gigantic", excerpt_of(text))
    else:
        yield Document(source, uri, 1, text)


def list_source_files(kind: str, uri: str, *, source: str | None = None) -> list[str]:
    """Sorted input file URIs for a source URI (a file, or a directory/prefix, local or s3://).

    Files are kept by the kind's suffixes (`SUFFIXES`; `jsonl` is accepted for `pile`). Raises
    `SourceError` naming the source (when given) and the URI if nothing matches, `ValueError` for an
    unknown kind.
    """
    kind = _KIND_ALIASES.get(kind, kind)
    if kind not in SUFFIXES:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {sorted(SUFFIXES)} (or 'jsonl')")
    suffixes = SUFFIXES[kind]
    try:
        if storage.is_s3(uri):
            single = uri.lower().endswith(suffixes) and storage.exists(uri)
            files = [uri] if single else storage.list_files(uri)
        else:
            files = [uri] if Path(uri).is_file() else storage.list_files(uri)
    except OSError as e:
        raise SourceError(f"source {source or kind!r}: cannot list {uri}: {e}") from e
    files = sorted(f for f in files if f.lower().endswith(suffixes))
    if not files:
        raise SourceError(f"source {source or kind!r}: no {'/'.join(suffixes)} files at {uri}; check data.sources[].uri")
    return files
