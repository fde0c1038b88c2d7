"""The data-prep stage: sources -> cleaned, exact-deduplicated, tokenized, packed dataset + manifest.

The dataset id is a content hash of the data configuration and every input file's sha256, so a
re-run with the same inputs finds the finished dataset (its manifest, written last) and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict

import numpy as np

from opt import storage
from opt.config import DataConfig
from opt.data.clean import content_hash, normalize
from opt.data.manifest import MANIFEST_FILE, DatasetError, DatasetManifest, SourceStats, load_manifest
from opt.data.sources import Document, Rejected, read_source, source_files
from opt.data.tokenizer import EOS_ID, TOKENIZER_FILE, padded_vocab_size, train_tokenizer

log = logging.getLogger(__name__)


def dataset_id(data: DataConfig) -> tuple[str, list[dict]]:
    """(id, inputs): the id hashes the data config and each input file's sha256."""
    inputs = []
    for src in data.sources:
        for uri in source_files(src):
            info = storage.stat(uri)
            inputs.append({"source": src.name, "uri": uri, "size": info.size, "sha256": info.sha256})
    # content, not location: the same files under another path give the same id
    config = data.model_dump(mode="json", exclude={"sources": {"__all__": {"uri"}}})
    payload = json.dumps({"config": config, "inputs": [(i["source"], i["sha256"]) for i in inputs]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16], inputs


def _is_valid(text_hash: str, fraction: float) -> bool:
    return int(text_hash[:8], 16) / 0x1_0000_0000 < fraction


def prepare_dataset(data: DataConfig, store_root: str) -> tuple[DatasetManifest, bool]:
    """Build (or reuse) the dataset for `data` under `<store_root>/datasets/<id>/`; returns (manifest, reused)."""
    did, inputs = dataset_id(data)
    uri = storage.join(store_root, "datasets", did)
    if storage.exists(storage.join(uri, MANIFEST_FILE)):
        log.info("dataset %s already prepared at %s; reusing it", did, uri)
        return load_manifest(uri), True

    stats = {s.name: SourceStats() for s in data.sources}
    seen: set[str] = set()
    train: list[Document] = []
    valid: dict[str, list[Document]] = {s.name: [] for s in data.sources}
    quarantine: dict[str, list[str]] = {s.name: [] for s in data.sources}
    for src in data.sources:
        st = stats[src.name]
        for item in read_source(src):
            st.docs_in += 1
            if isinstance(item, Rejected):
                st.drop(item.reason)
                quarantine[src.name].append(json.dumps(asdict(item), ensure_ascii=False))
                continue
            text = normalize(item.text)
            if len(text) < data.min_chars:
                st.drop("too_short")
                continue
            h = content_hash(text)
            if h in seen:  # the first copy in config order survives
                st.exact_duplicates += 1
                continue
            seen.add(h)
            doc = Document(item.source, item.file, item.line, text, item.doc_id)
            (valid[src.name] if _is_valid(h, data.valid_fraction) else train).append(doc)
        own = [i for i, d in enumerate(train) if d.source == src.name]
        if not valid[src.name] and own:
            valid[src.name].append(train.pop(own[-1]))  # every source gets a validation split, however small
    if not train:
        raise DatasetError(f"no usable training documents in sources {[s.name for s in data.sources]}: {stats}")

    t0 = time.perf_counter()
    tokenizer = train_tokenizer((d.text for d in train), data.tokenizer.vocab_size, data.tokenizer.min_frequency)
    vocab = padded_vocab_size(tokenizer.get_vocab_size())
    log.info("tokenizer: %d tokens (padded to %d) in %.1fs", tokenizer.get_vocab_size(), vocab, time.perf_counter() - t0)

    files: dict[str, dict] = {}

    def put(rel: str, payload: bytes) -> None:
        info = storage.write_bytes(storage.join(uri, rel), payload)
        files[rel] = {"size": info.size, "sha256": info.sha256}

    def pack(docs: list[Document], split: str) -> np.ndarray:
        # documents joined with </s>, as OPT packed its corpus
        ids: list[int] = []
        for doc, enc in zip(docs, tokenizer.encode_batch([d.text for d in docs]), strict=False):
            ids.extend(enc.ids)
            ids.append(EOS_ID)
            st = stats[doc.source]
            setattr(st, f"{split}_docs", getattr(st, f"{split}_docs") + 1)
            setattr(st, f"{split}_tokens", getattr(st, f"{split}_tokens") + len(enc.ids) + 1)
        return np.asarray(ids, dtype=np.uint16)

    # interleave sources in a fixed pseudo-random order (by content hash) so batches mix them
    train.sort(key=lambda d: content_hash(d.text))
    put("train/tokens.bin", pack(train, "train").tobytes())
    for name, docs in valid.items():
        put(f"valid/{name}.bin", pack(docs, "valid").tobytes())
    put(f"tokenizer/{TOKENIZER_FILE}", tokenizer.to_str().encode("utf-8"))
    for name, lines in quarantine.items():
        if lines:
            put(f"quarantine/{name}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))

    manifest = DatasetManifest(
        dataset_id=did,
        uri=uri,
        seq_len=data.seq_len,
        vocab_size=vocab,
        tokenizer_sha256=files[f"tokenizer/{TOKENIZER_FILE}"]["sha256"],
        inputs=inputs,
        sources=stats,
        files=files,
        config=data.model_dump(mode="json"),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    # the manifest is written last: its presence marks the dataset complete
    storage.write_text(storage.join(uri, MANIFEST_FILE), manifest.to_json())
    return manifest, False
