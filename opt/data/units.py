"""The units of work of a dataset build. Each runs in a worker process, reads only its inputs, writes
only its own files under the work directory, and is deterministic, so a resumed build produces
byte-identical output.

Per-unit files (`clean/<unit>.*`): `docs.jsonl.zst` (kept documents: text, file, line, id),
`meta.jsonl` (file, line, id of each kept document, for the duplicates report), `hash.u64`
(exact-duplicate keys), `sig.u32` (MinHash signatures, n x num_perm), `quarantine.jsonl`.
Per-unit token files (`tokens/<unit>.<split>.bin`): each kept document's tokens followed by `</s>`.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opt.data.clean import normalize
from opt.data.config import DedupConfig, FilterConfig, SourceConfig
from opt.data.filters import drop_reason
from opt.data.sources import Document, Rejected
from opt.data.workdir import WorkDir

ZSTD_LEVEL = 3  # single-threaded zstd at a fixed level is deterministic: resumed output is byte-identical
ENCODE_BATCH = 512


@dataclass(frozen=True)
class Unit:
    """One piece of work: `kind` is `file` (one pile/text input), `reddit-partition` (one dump file)
    or `reddit-bucket` (one bucket of threads across every dump file of a source)."""

    id: str
    source: str
    kind: str
    inputs: tuple[str, ...]
    size: int = 0
    """Input bytes, for progress and throughput."""


@dataclass
class CleanResult:
    docs_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def exact_key(text: str) -> int:
    """Exact-duplicate key: 64-bit xxh3 of the text with case and whitespace folded."""
    import xxhash

    return xxhash.xxh3_64_intdigest(" ".join(text.lower().split()).encode("utf-8"))


def _documents(unit: Unit, source: SourceConfig, filters: FilterConfig) -> Iterator[Document | Rejected]:
    from opt.data import readers

    if unit.kind == "reddit-bucket":
        from opt.data import reddit

        yield from reddit.threads_from_buckets(source.name, [Path(p) for p in unit.inputs])
        return
    (uri,) = unit.inputs
    if source.kind == "text":
        yield from readers.read_text(source.name, uri, filters.max_chars)
    else:
        yield from readers.read_pile(source.name, uri, filters.max_chars)


def clean_unit(work_root: str, unit: Unit, source: SourceConfig, filters: FilterConfig, dedup: DedupConfig) -> dict[str, Any]:
    """Read, normalise, filter, key and sign one unit's documents; quarantine what cannot be used."""
    import zstandard

    from opt.data.minhash import MinHasher

    work = WorkDir(Path(work_root))
    done = work.is_done("clean", unit.id)
    if done is not None:
        return done["result"]
    names = ("docs.jsonl.zst", "meta.jsonl", "hash.u64", "sig.u32", "quarantine.jsonl")
    paths = {k: work.path("clean", f"{unit.id}.{k}") for k in names}
    hasher = MinHasher(dedup.num_perm, dedup.ngram)
    res = CleanResult(bytes_in=unit.size)
    pending_texts: list[str] = []
    pending_keys: list[int] = []
    with (
        open(paths["docs.jsonl.zst"], "wb") as raw_docs,
        open(paths["meta.jsonl"], "w", encoding="utf-8") as meta,
        open(paths["hash.u64"], "wb") as hashes,
        open(paths["sig.u32"], "wb") as sigs,
        open(paths["quarantine.jsonl"], "w", encoding="utf-8") as quarantine,
    ):
        docs = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0).stream_writer(raw_docs, closefd=False)

        def flush() -> None:
            if pending_texts:
                np.asarray(pending_keys, dtype=np.uint64).tofile(hashes)
                hasher.signatures(pending_texts).astype(np.uint32, copy=False).tofile(sigs)
                pending_texts.clear()
                pending_keys.clear()

        for item in _documents(unit, source, filters):
            res.docs_in += 1
            if isinstance(item, Rejected):
                res.drop(item.reason)
                quarantine.write(json.dumps(asdict(item), ensure_ascii=False, sort_keys=True) + "\n")
                continue
            text = normalize(item.text)
            reason = drop_reason(text, filters)
            if reason is not None:
                res.drop(reason)
                if reason == "gigantic":  # kept for inspection: it may be a broken record, not bad text
                    rec = Rejected(item.source, item.file, item.line, reason, text[:200])
                    quarantine.write(json.dumps(asdict(rec), ensure_ascii=False, sort_keys=True) + "\n")
                continue
            res.kept += 1
            record = {"t": text, "f": item.file, "l": item.line, "i": item.doc_id}
            docs.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            # where the document came from, apart from its text: the dedup report reads only this
            meta.write(json.dumps([item.file, item.line, item.doc_id], ensure_ascii=False) + "\n")
            pending_keys.append(exact_key(text))
            pending_texts.append(text)
            if len(pending_texts) >= 1024:
                flush()
        flush()
        docs.close()
    result = asdict(res)
    work.mark_done("clean", unit.id, list(paths.values()), result)
    return result


def read_docs(work: WorkDir, unit_id: str) -> Iterator[dict[str, Any]]:
    """The kept documents of a cleaned unit, in order."""
    import zstandard

    with open(work.root / "clean" / f"{unit_id}.docs.jsonl.zst", "rb") as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for line in reader:
            yield json.loads(line)


def read_meta(work: WorkDir, unit_id: str) -> Iterator[tuple[str, int, str | None]]:
    """(file, line, id) of each kept document of a cleaned unit, in order, without reading its text."""
    with open(work.root / "clean" / f"{unit_id}.meta.jsonl", encoding="utf-8") as f:
        for line in f:
            file, lineno, doc_id = json.loads(line)
            yield file, lineno, doc_id


@functools.lru_cache(maxsize=2)
def _encoder(tokenizer_path: str, engine: str, mtime_ns: int) -> Any:
    """One encoder per worker process (keyed by the file's version): building tiktoken's ranks for a
    50k vocabulary again for every unit is wasted work."""
    from opt.data.tokenizer import BatchEncoder

    return BatchEncoder(tokenizer_path, engine)


def tokenize_unit(
    work_root: str, unit_id: str, tokenizer_path: str, engine: str, offset: int, count: int, token_dtype: str
) -> dict[str, Any]:
    """Tokenize a unit's surviving documents into its train and valid token streams.

    `offset` is the unit's first global document index; `dedup/keep.u8` and `dedup/split.u8` (0 train,
    1 valid) say which documents survive and where they go.
    """
    from opt.data.tokenizer import EOS_ID

    work = WorkDir(Path(work_root))
    done = work.is_done("tokenize", unit_id)
    if done is not None:
        return done["result"]
    keep = np.memmap(work.root / "dedup" / "keep.u8", dtype=np.uint8, mode="r")[offset : offset + count]
    split = np.memmap(work.root / "dedup" / "split.u8", dtype=np.uint8, mode="r")[offset : offset + count]
    tok = _encoder(tokenizer_path, engine, os.stat(tokenizer_path).st_mtime_ns)
    outs = {s: work.path("tokens", f"{unit_id}.{s}.bin") for s in ("train", "valid")}
    result = {"train_docs": 0, "valid_docs": 0, "train_tokens": 0, "valid_tokens": 0}
    with open(outs["train"], "wb") as f_train, open(outs["valid"], "wb") as f_valid:
        files = {"train": f_train, "valid": f_valid}
        batch: list[tuple[str, str]] = []

        def flush() -> None:
            for (name, _), ids_list in zip(batch, tok.encode_batch([t for _, t in batch]), strict=True):
                ids = np.asarray(ids_list + [EOS_ID], dtype=token_dtype)
                ids.tofile(files[name])
                result[f"{name}_docs"] += 1
                result[f"{name}_tokens"] += int(ids.size)
            batch.clear()

        for k, doc in enumerate(read_docs(work, unit_id)):
            if keep[k]:
                batch.append(("valid" if split[k] else "train", doc["t"]))
                if len(batch) >= ENCODE_BATCH:
                    flush()
        flush()
    work.mark_done("tokenize", unit_id, list(outs.values()), result)
    return result
