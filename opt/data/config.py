"""Configuration of the data-prep stage (the `data:` section of a run configuration)."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SOURCE_KINDS = ("pile", "reddit", "text")
_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)=)?(?P<kind>[a-z]+):(?P<uri>.+)$")


def parse_source_spec(spec: str, taken: set[str]) -> dict[str, str]:
    """`[NAME=]KIND:URI` (e.g. `pile:s3://corpora/pile/`, `books=text:/data/books`) -> a source dict.

    Without NAME the name comes from the URI's last path part (`pile`, `RC_2019-01`), made unique.
    """
    m = _SPEC.match(spec)
    if not m or m["kind"] not in SOURCE_KINDS:
        raise ValueError(f"--source {spec!r}: expected [NAME=]KIND:URI with KIND one of {', '.join(SOURCE_KINDS)}")
    name = m["name"]
    if name is None:
        stem = m["uri"].rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0] or m["kind"]
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or m["kind"]
        name, k = base, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return {"name": name, "kind": m["kind"], "uri": m["uri"]}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class FilterConfig(_Section):
    """Length and quality filters; each dropped document is counted under the filter's name."""

    min_chars: int = Field(64, ge=0)
    """Shorter documents (after cleaning) are dropped as `too_short`."""
    max_chars: int = Field(2_000_000, ge=1)
    """Longer documents are quarantined as `gigantic` (they are usually dumps, not prose)."""
    min_words: int = Field(5, ge=0)
    """Documents with fewer whitespace-separated words are dropped as `too_few_words`."""
    max_symbol_ratio: float = Field(0.5, gt=0, le=1)
    """Documents where more than this share of non-space characters is neither a letter nor a digit
    are dropped as `symbols` (tables of numbers, base64, ASCII art)."""
    max_duplicate_line_ratio: float = Field(0.5, gt=0, le=1)
    """Documents whose repeated lines make up more than this share of lines are dropped as `repeated_lines`."""

    @model_validator(mode="after")
    def _ordered(self) -> FilterConfig:
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        return self


class SourceConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Source name used in the manifest, the shards and the validation split (e.g. `pile-cc`)."""
    kind: Literal["pile", "reddit", "text"] = "pile"
    """`pile`: JSONL(.gz/.zst) with `text`; `reddit`: PushShift RS_/RC_ dumps, longest comment chain per
    thread; `text`: a file or directory tree of .txt files, one document each."""
    uri: str
    """Local path or `s3://` URI of a file or a directory/prefix."""
    weight: float = Field(1.0, ge=0)
    """Mixture weight: how much more (or less) often than its size alone this source is sampled in
    training. 1.0 everywhere samples each source in proportion to its tokens, as OPT did."""
    filters: FilterConfig | None = None
    """Per-source filters; None uses `data.filters`."""

    @model_validator(mode="before")
    @classmethod
    def _jsonl_alias(cls, data: object) -> object:
        # `jsonl` was the kind's first name; keep old configs working
        if isinstance(data, dict) and data.get("kind") == "jsonl":
            return {**data, "kind": "pile"}
        return data


class DedupConfig(_Section):
    exact: bool = True
    """Drop documents whose normalised text (case and whitespace folded) was seen before."""
    near: bool = True
    """Drop near duplicates found by MinHash LSH."""
    threshold: float = Field(0.95, gt=0.5, le=1.0)
    """Jaccard similarity of word n-gram shingle sets at which two documents are near duplicates (OPT: 0.95): MinHash
    LSH proposes candidate pairs, and each is decided by the exact Jaccard of the two documents' shingles."""
    num_perm: int = Field(128, ge=16, le=1024)
    """MinHash permutations (signature length)."""
    ngram: int = Field(5, ge=1, le=32)
    """Words per shingle."""


class TokenizerConfig(_Section):
    vocab_size: int = Field(2048, ge=260, le=65536)
    """Byte-level BPE vocabulary to train, before padding to a multiple of 8 (OPT: 50265 -> 50272)."""
    min_frequency: int = Field(2, ge=1)
    """Minimum pair count for a BPE merge."""
    vocab_file: str | None = None
    """GPT-2 `vocab.json` to use instead of training (what OPT used); needs `merges_file`."""
    merges_file: str | None = None
    """GPT-2 `merges.txt` matching `vocab_file`."""
    train_docs: int = Field(200_000, ge=1)
    """Training a tokenizer reads at most this many training documents (a deterministic sample)."""

    @model_validator(mode="after")
    def _pair(self) -> TokenizerConfig:
        if (self.vocab_file is None) != (self.merges_file is None):
            raise ValueError("vocab_file and merges_file go together: give both or neither")
        return self


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(name="python-docs", uri="data/sample/python-docs.jsonl")])
    filters: FilterConfig = FilterConfig()
    """Default filters for sources without their own."""
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = Field(128, ge=8)
    """Packed sequence length; training reads windows of seq_len + 1 tokens."""
    valid_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Share of each source's documents held out for validation (chosen by document hash), so each
    source's validation split is in proportion to its size."""
    workers: int = Field(0, ge=0)
    """Processes for reading, cleaning and tokenizing; 0 means one per CPU core."""
    reddit_buckets: int = Field(64, ge=1, le=4096)
    """Reddit comments are spilled to this many buckets by thread, so memory holds one bucket at a time."""

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in v]
        if not v:
            raise ValueError("at least one source is required")
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if not any(s.weight > 0 for s in v):
            raise ValueError("at least one source needs a weight above 0")
        return v

    def filters_for(self, source: SourceConfig) -> FilterConfig:
        return source.filters or self.filters

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1
