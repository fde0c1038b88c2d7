"""Readers for input sources. Each yields `Document`s or `Rejected` records, streaming line by line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from opt import storage
from opt.config import SourceConfig
from opt.errors import OptError


class SourceError(OptError):
    """A source that cannot be read at all (missing, empty, unreadable)."""


@dataclass(frozen=True)
class Document:
    source: str
    file: str
    line: int
    text: str
    doc_id: str | None = None


@dataclass(frozen=True)
class Rejected:
    """An input record that could not be used; it goes to `quarantine/` with its reason."""

    source: str
    file: str
    line: int
    reason: str
    excerpt: str


def source_files(src: SourceConfig) -> list[str]:
    """The input file URIs of a source, sorted; raises SourceError naming the source if there are none."""
    suffixes = (".jsonl",) if src.kind == "jsonl" else (".txt",)
    uri = src.uri
    if storage.is_s3(uri):
        files = [uri] if uri.endswith(suffixes) and storage.exists(uri) else storage.list_files(uri)
    elif Path(uri).is_file():
        files = [uri]
    else:
        files = storage.list_files(uri)
    files = [f for f in files if f.endswith(suffixes)]
    if not files:
        raise SourceError(f"source {src.name!r}: no {'/'.join(suffixes)} files at {uri}; check data.sources[].uri")
    return files


def read_source(src: SourceConfig) -> Iterator[Document | Rejected]:
    for uri in source_files(src):
        yield from (_read_jsonl(src.name, uri) if src.kind == "jsonl" else _read_text(src.name, uri))


def _iter_lines(name: str, uri: str) -> Iterator[bytes]:
    """Raw lines of a file. Local files stream; S3 objects are fetched whole (streaming: issue 3)."""
    try:
        if storage.is_s3(uri):
            yield from storage.read_bytes(uri).splitlines()
            return
        with open(uri, "rb") as f:
            yield from f
    except OSError as e:
        raise SourceError(f"source {name!r}: cannot read {uri}: {e}") from e


def _read_jsonl(name: str, uri: str) -> Iterator[Document | Rejected]:
    for lineno, line in enumerate(_iter_lines(name, uri), start=1):
        if not line.strip():
            continue
        excerpt = line[:200].decode("utf-8", "replace")
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield Rejected(name, uri, lineno, "invalid_utf8", excerpt)
            continue
        except json.JSONDecodeError:
            yield Rejected(name, uri, lineno, "invalid_json", excerpt)
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            yield Rejected(name, uri, lineno, "missing_text", excerpt)
            continue
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        doc_id = meta.get("id")
        yield Document(name, uri, lineno, text, str(doc_id) if doc_id is not None else None)


def _read_text(name: str, uri: str) -> Iterator[Document | Rejected]:
    try:
        data = storage.read_bytes(uri)
    except OSError as e:
        raise SourceError(f"source {name!r}: cannot read {uri}: {e}") from e
    try:
        yield Document(name, uri, 1, data.decode("utf-8"))
    except UnicodeDecodeError:
        yield Rejected(name, uri, 1, "invalid_utf8", data[:200].decode("utf-8", "replace"))
