"""The dataset manifest: the contract between data preparation and training (see docs/architecture.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from opt import storage
from opt.errors import OptError

MANIFEST_FILE = "manifest.json"
TOKEN_DTYPE = "uint16"  # vocabularies up to 65536 (OPT's is 50272); uint32 beyond
SHARD_FORMAT = "megatron-mmidx/1"


class DatasetError(OptError):
    """A dataset that is missing, incomplete or does not match its manifest."""


@dataclass
class SourceStats:
    docs_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    train_docs: int = 0
    valid_docs: int = 0
    train_tokens: int = 0
    valid_tokens: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass
class DatasetManifest:
    dataset_id: str
    uri: str
    seq_len: int
    vocab_size: int
    """Model vocabulary: the tokenizer's, padded to a multiple of 8."""
    tokenizer_sha256: str
    inputs: list[dict[str, Any]]
    sources: dict[str, SourceStats]
    files: dict[str, dict[str, Any]]
    """Relative path -> {size, sha256} for every file the dataset holds."""
    config: dict[str, Any]
    token_dtype: str = TOKEN_DTYPE
    weights: dict[str, float] = field(default_factory=dict)
    """Mixture weight per source (1.0: sampled in proportion to its tokens)."""
    format: str = SHARD_FORMAT
    """Shards are Megatron-LM indexed datasets: `<split>/<source>.bin` (tokens) + `.idx`."""
    dedup: dict[str, Any] = field(default_factory=dict)
    """How near duplicates were decided, across all sources: LSH `bands` x `rows`, `decision` (`exact_jaccard`),
    `candidate_pairs`, `checked` (decided; the rest were already joined), `rejected` (below the threshold) and
    `candidate_docs`. Empty when the near pass did not run."""

    def near_summary(self) -> str | None:
        """One line on how near duplicates were decided, or None for a dataset without a near pass (or built before
        the manifest recorded it)."""
        d = self.dedup
        if not d:
            return None
        threshold = self.config.get("dedup", {}).get("threshold", 0.95)
        rule = "exact Jaccard" if d.get("decision") == "exact_jaccard" else "MinHash estimate"
        return (f"near duplicates: {rule} >= {threshold:g} on {d['candidate_pairs']:,} LSH candidate pairs "
                f"({d['bands']} x {d['rows']} bands): {d['checked']:,} checked, {d['rejected']:,} rejected")  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DatasetManifest:
        data = json.loads(text)
        data["sources"] = {k: SourceStats(**v) for k, v in data["sources"].items()}
        return cls(**data)

    def file_uri(self, rel: str) -> str:
        return storage.join(self.uri, rel)

    @property
    def train_tokens(self) -> int:
        return sum(s.train_tokens for s in self.sources.values())


def load_manifest(dataset_uri: str) -> DatasetManifest:
    uri = storage.join(dataset_uri, MANIFEST_FILE)
    if not storage.exists(uri):
        raise DatasetError(f"{dataset_uri}: no {MANIFEST_FILE}; run `optctl data prep` first")
    return DatasetManifest.from_json(storage.read_text(uri))
