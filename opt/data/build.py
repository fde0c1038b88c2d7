"""The global stages of a dataset build: dedup, tokenizer, packing per source, publishing."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from opt import storage
from opt.data.config import DataConfig
from opt.data.jaccard import ShingleSource
from opt.data.manifest import MANIFEST_FILE, DatasetManifest, SourceStats
from opt.data.tokenizer import TOKENIZER_FILE, padded_vocab_size
from opt.data.units import Unit, read_docs, read_meta
from opt.data.workdir import WorkDir

log = logging.getLogger(__name__)

DUPLICATES_FILE = "duplicates.jsonl"
READ_CHUNK = 1 << 20  # tokens per read while packing: memory stays bounded whatever the corpus size


def _concat(work: WorkDir, units: list[Unit], suffix: str, dtype: str, dst: Path) -> np.memmap:
    """Concatenate the units' per-document arrays (unit order = global order) into one memmap file."""
    with open(dst, "wb") as out:
        for u in units:
            with open(work.root / "clean" / f"{u.id}.{suffix}", "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    return np.memmap(dst, dtype=dtype, mode="r")


def _doc_sources(units: list[Unit], offsets: np.ndarray, names: list[str]) -> np.ndarray:
    """Source index of every global document."""
    src = np.empty(int(offsets[-1]), dtype=np.int32)
    for k, u in enumerate(units):
        src[offsets[k] : offsets[k + 1]] = names.index(u.source)
    return src


def _iter_meta(work: WorkDir, units: list[Unit]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(global index, source, {file, line, id}) of every kept document, without reading texts."""
    g = 0
    for u in units:
        for file, line, doc_id in read_meta(work, u.id):
            yield g, u.source, {"file": file, "line": line, "id": doc_id}
            g += 1


def _shingle_source(work: WorkDir, units: list[Unit], offsets: np.ndarray, data: DataConfig) -> ShingleSource:
    """The near pass's ShingleSource: reads only the units holding a wanted document, each only as far as its last one."""
    from opt.data.minhash import MinHasher

    hasher = MinHasher(data.dedup.num_perm, data.dedup.ngram)

    def source(docs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for k, u in enumerate(units):
            lo, hi = int(offsets[k]), int(offsets[k + 1])
            wanted = docs[(docs >= lo) & (docs < hi)].tolist()
            if not wanted:
                continue
            batch: list[int] = []
            texts: list[str] = []
            w = 0
            for g, doc in enumerate(read_docs(work, u.id), start=lo):
                if g == wanted[w]:
                    batch.append(g)
                    texts.append(doc["t"])
                    w += 1
                    if len(batch) >= 1024 or w == len(wanted):
                        yield from zip(batch, hasher.shingle_hashes(texts), strict=True)
                        batch, texts = [], []
                    if w == len(wanted):
                        break

    return source


def dedup_stage(work: WorkDir, data: DataConfig, units: list[Unit], offsets: np.ndarray, stats: dict[str, SourceStats]) -> dict[str, Any]:
    """Exact then near duplicates across all sources; writes keep/split masks and the duplicates report.

    Returns the near pass's counts (bands, candidate pairs checked and rejected) for the manifest.
    """
    from dataclasses import asdict

    from opt.data.dedup import find_duplicates

    done = work.is_done("dedup", "all")
    if done is None:
        n = int(offsets[-1])
        names = [s.name for s in data.sources]
        hashes = _concat(work, units, "hash.u64", "uint64", work.path("dedup", "hashes.u64"))
        sigs = _concat(work, units, "sig.u32", "uint32", work.path("dedup", "sigs.u32")).reshape(n, data.dedup.num_perm)
        keys = hashes if data.dedup.exact else np.arange(n, dtype=np.uint64)
        spill = work.path("dedup", "spill", "x").parent
        shingles = _shingle_source(work, units, offsets, data)
        result = find_duplicates(keys, sigs, threshold=data.dedup.threshold, work_dir=spill, near=data.dedup.near, shingles=shingles)
        keep = result.keep.astype(np.uint8)
        # validation split by content hash, so it is stable across re-runs and machines
        split = (hashes.astype(np.float64) / 2.0**64 < data.valid_fraction).astype(np.uint8)
        src = _doc_sources(units, offsets, names)
        counts: dict[str, dict[str, int]] = {name: {"exact": 0, "near": 0} for name in names}
        for k, name in enumerate(names):
            mine = src == k
            kept_mine = np.flatnonzero(mine & (keep == 1))
            if kept_mine.size and not split[kept_mine].any():  # every source gets a validation split
                split[kept_mine[np.argmin(hashes[kept_mine])]] = 1
            counts[name]["exact"] = int(np.count_nonzero(mine & (result.exact_of >= 0)))
            counts[name]["near"] = int(np.count_nonzero(mine & (result.near_of >= 0)))
        keep.tofile(work.path("dedup", "keep.u8"))
        split.tofile(work.path("dedup", "split.u8"))
        _write_report(work, units, result)
        for p in (work.root / "dedup" / "hashes.u64", work.root / "dedup" / "sigs.u32"):
            p.unlink()
        outputs = [work.root / "dedup" / f for f in ("keep.u8", "split.u8", DUPLICATES_FILE)]
        near = asdict(result.near_stats) if result.near_stats is not None else {}
        done = work.mark_done("dedup", "all", outputs, {"duplicates": counts, "near": near})
    for name, c in done["result"]["duplicates"].items():
        stats[name].exact_duplicates, stats[name].near_duplicates = c["exact"], c["near"]
    return dict(done["result"].get("near", {}))


def _write_report(work: WorkDir, units: list[Unit], result: Any) -> None:
    """One line per removed document naming it (source, file, line, id) and the kept document it duplicates."""
    target = np.where(result.exact_of >= 0, result.exact_of, result.near_of)
    removed = np.flatnonzero(target >= 0)
    wanted = set(target[removed].tolist())
    kept_meta: dict[int, dict[str, Any]] = {}
    for g, source, doc in _iter_meta(work, units):  # first pass: only the documents that were duplicated
        if g in wanted:
            kept_meta[g] = {"source": source, **doc}
    removed_set = set(removed.tolist())
    with open(work.path("dedup", DUPLICATES_FILE), "w", encoding="utf-8") as out:
        for g, source, doc in _iter_meta(work, units):
            if g not in removed_set:
                continue
            exact = bool(result.exact_of[g] >= 0)
            line = {
                "source": source, **doc,
                "kind": "exact" if exact else "near",
                "similarity": 1.0 if exact else round(float(result.near_similarity[g]), 4),
                "duplicate_of": kept_meta[int(target[g])],
            }  # fmt: skip
            if not exact:  # `similarity` is the exact Jaccard of the shingle sets; the MinHash estimate beside it
                line["estimate"] = round(float(result.near_estimate[g]), 4)
            out.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")


def _training_docs(work: WorkDir, units: list[Unit], limit: int, spread: bool = True) -> Iterator[str]:
    """At most `limit` surviving training documents, deterministic: evenly spread over the corpus, or
    (spread=False) the first ones, which reads only as far as needed."""
    keep = np.fromfile(work.root / "dedup" / "keep.u8", dtype=np.uint8)
    split = np.fromfile(work.root / "dedup" / "split.u8", dtype=np.uint8)
    eligible = (keep == 1) & (split == 0)
    stride = max(1, math.ceil(int(eligible.sum()) / limit)) if spread else 1
    rank, g = 0, 0
    for u in units:
        for doc in read_docs(work, u.id):
            if eligible[g]:
                if rank % stride == 0:
                    yield doc["t"]
                    if rank // stride + 1 >= limit:
                        return
                rank += 1
            g += 1


def build_tokenizer(work: WorkDir, data: DataConfig, units: list[Unit], offsets: np.ndarray) -> tuple[Path, int, str]:
    """GPT-2 BPE from the given vocab/merges, or one trained on the corpus.

    Returns (path, padded vocab, engine): the engine that encodes the corpus, `tiktoken` when it was
    shown to give HF tokenizers' ids on a sample of the corpus, else `hf`.
    """
    from opt.data.tokenizer import BatchEncoder, from_gpt2_files, load_tokenizer, train_tokenizer

    path = work.path("tokenizer", TOKENIZER_FILE)
    done = work.is_done("tokenizer", "all")
    if done is None:
        t = data.tokenizer
        if t.vocab_file and t.merges_file:
            tok = from_gpt2_files(t.vocab_file, t.merges_file)
        else:
            tok = train_tokenizer(_training_docs(work, units, t.train_docs), t.vocab_size, t.min_frequency)
        path.write_text(tok.to_str())
        encoder = BatchEncoder(str(path))
        encoder.verify(list(_training_docs(work, units, 200, spread=False)))
        result = {"vocab_size": padded_vocab_size(tok.get_vocab_size()), "engine": encoder.engine}
        done = work.mark_done("tokenizer", "all", [path], result)
    load_tokenizer(str(path))  # fail here, not in a worker, if the file is unreadable
    return path, int(done["result"]["vocab_size"]), str(done["result"]["engine"])


def pack_source(work: WorkDir, source: str, units: list[Unit], seq_len: int, token_dtype: str) -> None:
    """Pack a source's token streams into Megatron MMIDIDX shards of `seq_len`-token sequences."""
    from opt.data.indexed import IndexedDatasetWriter

    if work.is_done("pack", source) is not None:
        return
    outputs: list[Path] = []
    for split in ("train", "valid"):
        prefix = work.path("out", split, source)
        carry = np.zeros(0, dtype=token_dtype)
        with IndexedDatasetWriter(prefix, dtype=np.dtype(token_dtype)) as writer:
            for u in units:
                with open(work.root / "tokens" / f"{u.id}.{split}.bin", "rb") as f:
                    while (chunk := np.fromfile(f, dtype=token_dtype, count=READ_CHUNK)).size:
                        carry = np.concatenate([carry, chunk])
                        full = carry.size // seq_len * seq_len
                        for start in range(0, full, seq_len):
                            writer.add_document(carry[start : start + seq_len])
                        carry = carry[full:]
            if carry.size:
                writer.add_document(carry)  # the remainder is kept as a shorter last sequence
        outputs += [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]  # not with_suffix: source names may hold dots
    work.mark_done("pack", source, outputs, {})


def _merge_quarantine(work: WorkDir, source: str, units: list[Unit], extra: list[Path]) -> Path | None:
    dst = work.path("out", "quarantine", f"{source}.jsonl")
    parts = extra + [work.root / "clean" / f"{u.id}.quarantine.jsonl" for u in units if u.source == source]
    with open(dst, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    return dst if dst.stat().st_size else None


def publish(
    work: WorkDir, data: DataConfig, did: str, uri: str, inputs: list[dict[str, Any]], stats: dict[str, SourceStats],
    vocab: int, token_dtype: str, units: list[Unit], extra_quarantine: dict[str, list[Path]], near: dict[str, Any],
) -> DatasetManifest:  # fmt: skip
    """Copy the outputs into the store and write the manifest last (its presence marks the dataset complete)."""
    local: dict[str, Path] = {f"tokenizer/{TOKENIZER_FILE}": work.root / "tokenizer" / TOKENIZER_FILE}
    local[DUPLICATES_FILE] = work.root / "dedup" / DUPLICATES_FILE
    for src in data.sources:
        for split in ("train", "valid"):
            for ext in (".bin", ".idx"):
                local[f"{split}/{src.name}{ext}"] = work.root / "out" / split / f"{src.name}{ext}"
        q = _merge_quarantine(work, src.name, units, extra_quarantine.get(src.name, []))
        if q is not None:
            local[f"quarantine/{src.name}.jsonl"] = q
    files: dict[str, dict[str, Any]] = {}
    for rel, path in sorted(local.items()):
        info = storage.put_file(path, storage.join(uri, rel))
        files[rel] = {"size": info.size, "sha256": info.sha256}
    manifest = DatasetManifest(
        dataset_id=did,
        uri=uri,
        seq_len=data.seq_len,
        vocab_size=vocab,
        tokenizer_sha256=str(files[f"tokenizer/{TOKENIZER_FILE}"]["sha256"]),
        inputs=inputs,
        sources=stats,
        files=files,
        config=data.model_dump(mode="json", exclude={"workers"}),  # how fast it was built is not what was built
        token_dtype=token_dtype,
        weights={s.name: s.weight for s in data.sources},
        dedup=near,
    )
    storage.write_text(storage.join(uri, MANIFEST_FILE), manifest.to_json())
    return manifest
