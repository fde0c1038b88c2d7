"""The data-prep stage: sources -> cleaned, deduplicated, tokenized, packed dataset + manifest.

Work is split into units (opt/data/units.py) that run in parallel processes and record their
completion with checksums, so a killed build re-run with the same inputs continues where it stopped
and produces byte-identical output; a finished dataset (its manifest is written last) is reused.

Stages: [reddit partition] -> clean (per file or Reddit bucket) -> dedup (global, bounded memory)
-> tokenizer -> tokenize (per unit) -> pack (per source, Megatron MMIDIDX) -> publish + manifest.
`DatasetBuild` exposes each stage so the Prefect flow (flows/data_prep.py) can run them as tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from opt import storage
from opt.data.config import DataConfig
from opt.data.manifest import MANIFEST_FILE, DatasetError, DatasetManifest, SourceStats, load_manifest
from opt.data.units import Unit, clean_unit, tokenize_unit
from opt.data.workdir import WorkDir

log = logging.getLogger(__name__)


# --- inputs and identity ------------------------------------------------------------------------------


def _fingerprint(uri: str, cache: dict[str, Any]) -> dict[str, Any]:
    """Size and sha256 of an input, cached by (size, mtime) locally or ETag on S3 so re-runs do not re-hash."""
    if storage.is_s3(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        head = storage.s3_client().head_object(Bucket=bucket, Key=key)
        stamp = f"{head['ContentLength']}:{head.get('ETag', '')}"
    else:
        st = os.stat(uri)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    hit = cache.get(uri)
    if hit and hit["stamp"] == stamp:
        return hit
    info = storage.stat(uri)
    cache[uri] = {"stamp": stamp, "size": info.size, "sha256": info.sha256}
    return cache[uri]


def list_inputs(data: DataConfig, cache_file: Path | None = None) -> list[dict[str, Any]]:
    """Every input file of every source with its size and sha256, in build order."""
    from opt.data.readers import list_source_files

    cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file and cache_file.is_file() else {}
    inputs = []
    for src in data.sources:
        for uri in list_source_files(src.kind, src.uri, source=src.name):
            fp = _fingerprint(uri, cache)
            inputs.append({"source": src.name, "uri": uri, "size": fp["size"], "sha256": fp["sha256"]})
    if cache_file is not None:
        storage.write_text(str(cache_file), json.dumps(cache, sort_keys=True))
    return inputs


# Bumped whenever the same configuration and inputs would build different data, so the id changes with it.
# 2: near duplicates decided by exact Jaccard of LSH candidates (10 x 12 bands), not by the MinHash estimate.
BUILD_RULES = 2


def dataset_id(data: DataConfig, inputs: list[dict[str, Any]] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(id, inputs): the id hashes the build rules, the data configuration and each input file's sha256, not their
    paths.

    `workers` is left out: it changes how fast a dataset is built, not what is built.
    """
    inputs = inputs if inputs is not None else list_inputs(data)
    config = data.model_dump(mode="json", exclude={"workers": True, "sources": {"__all__": {"uri"}}})
    files = [(i["source"], i["sha256"]) for i in inputs]
    payload = json.dumps({"rules": BUILD_RULES, "config": config, "inputs": files}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16], inputs


def work_home() -> Path:
    return Path(os.environ.get("OPT_HOME", ".opt")).resolve() / "work"


# --- running units ------------------------------------------------------------------------------------


class _Progress:
    """Documents, MB/s and ETA over the input bytes of a stage's units."""

    def __init__(self, stage: str, total_bytes: int, units: int, enabled: bool) -> None:
        self.bar: Any = None
        self.docs = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"{stage} ({units} units)", dynamic_ncols=True)

    def update(self, nbytes: int, docs: int) -> None:
        self.docs += docs
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix(docs=self.docs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_units(
    stage: str,
    units: list[Unit],
    fn: Callable[..., dict[str, Any]],
    args: Callable[[Unit], tuple],
    pool: ProcessPoolExecutor | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """`fn(*args(unit))` for every unit, in `pool`'s worker processes if given; results in unit order."""
    bar = _Progress(stage, sum(u.size for u in units), len(units), progress)
    results: list[dict[str, Any]] = []
    try:
        if pool is None or len(units) <= 1:
            for u in units:
                results.append(fn(*args(u)))
                bar.update(u.size, results[-1].get("docs_in", 0))
            return results
        futures: list[Future[dict[str, Any]]] = [pool.submit(fn, *args(u)) for u in units]
        for u, fut in zip(units, futures, strict=True):
            results.append(fut.result())
            bar.update(u.size, results[-1].get("docs_in", 0))
        return results
    finally:
        bar.close()


# --- the build ----------------------------------------------------------------------------------------


class DatasetBuild:
    """One dataset build, stage by stage. Every stage is resumable and safe to call again."""

    def __init__(self, data: DataConfig, store_root: str, work_root: Path | None = None, progress: bool = False) -> None:
        self.data, self.progress = data, progress
        home = work_root or work_home()
        home.mkdir(parents=True, exist_ok=True)
        self.id, self.inputs = dataset_id(data, list_inputs(data, home / "input-hashes.json"))
        self.uri = storage.join(store_root, "datasets", self.id)
        self.work = WorkDir(home / "datasets" / self.id)
        self.sources = {s.name: s for s in data.sources}
        self.stats = {s.name: SourceStats() for s in data.sources}
        self.units: list[Unit] = []
        self.kept: list[int] = []
        self.extra_quarantine: dict[str, list[Path]] = {s.name: [] for s in data.sources}
        self.offsets = np.zeros(1, dtype=np.int64)
        self.near: dict[str, Any] = {}
        self._pool: ProcessPoolExecutor | None = None

    @property
    def pool(self) -> ProcessPoolExecutor | None:
        """Worker processes shared by every stage (starting them costs a second or more each time)."""
        if self._pool is None and self.data.num_workers > 1:
            # spawn, not fork: the caller may hold threads (Prefect, Ray) that a fork would copy mid-flight
            self._pool = ProcessPoolExecutor(max_workers=self.data.num_workers, mp_context=get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def existing(self) -> DatasetManifest | None:
        """The finished dataset, if this exact build was published before."""
        return load_manifest(self.uri) if storage.exists(storage.join(self.uri, MANIFEST_FILE)) else None

    def _count(self, source: str, result: dict[str, Any]) -> None:
        st = self.stats[source]
        st.docs_in += result.get("docs_in", 0)
        for reason, n in result.get("dropped", {}).items():
            st.dropped[reason] = st.dropped.get(reason, 0) + n

    def plan(self, source: str) -> list[Unit]:
        """The clean units of one source (for Reddit, after partitioning every dump file by thread)."""
        from opt.data.reddit_units import bucket_units, partition_unit

        src = self.sources[source]
        files = [i for i in self.inputs if i["source"] == source]
        if src.kind != "reddit":
            return [Unit(f"{source}.{k:05d}", source, "file", (i["uri"],), i["size"]) for k, i in enumerate(files)]
        parts = [Unit(f"{source}.p{k:05d}", source, "reddit-partition", (i["uri"],), i["size"]) for k, i in enumerate(files)]
        root = str(self.work.root)
        results = run_units(f"partition {source}", parts, partition_unit, lambda u: (root, u, self.data.reddit_buckets),
                            self.pool, self.progress)  # fmt: skip
        for r in results:
            self._count(source, r)
            self.extra_quarantine[source].append(self.work.root / r["rejected_file"])
        return bucket_units(self.work, source, [r["part"] for r in results], self.data.reddit_buckets)

    def clean(self, source: str) -> list[dict[str, Any]]:
        """Read, clean, filter, key and sign every unit of `source`; records its units in the build.

        Safe to call again (a retried task): finished units are skipped and the source's counts restart.
        """
        self.stats[source] = SourceStats()
        self.extra_quarantine[source] = []
        pairs = [(u, k) for u, k in zip(self.units, self.kept, strict=True) if u.source != source]
        self.units, self.kept = [u for u, _ in pairs], [k for _, k in pairs]
        units = self.plan(source)
        src, root = self.sources[source], str(self.work.root)
        filters, dedup = self.data.filters_for(src), self.data.dedup
        results = run_units(f"clean {source}", units, clean_unit, lambda u: (root, u, src, filters, dedup),
                            self.pool, self.progress)  # fmt: skip
        for r in results:
            self._count(source, r)
        self.units += units
        self.kept += [r["kept"] for r in results]
        return results

    def dedup(self) -> None:
        from opt.data.build import dedup_stage

        order = [s.name for s in self.data.sources]
        pairs = sorted(zip(self.units, self.kept, strict=True), key=lambda p: order.index(p[0].source))
        self.units, self.kept = [u for u, _ in pairs], [k for _, k in pairs]
        self.offsets = np.concatenate([[0], np.cumsum(self.kept)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise DatasetError(f"no usable documents in sources {order}: " + json.dumps({k: v.dropped for k, v in self.stats.items()}))
        self.near = dedup_stage(self.work, self.data, self.units, self.offsets, self.stats)

    def tokenizer(self) -> None:
        from opt.data.build import build_tokenizer

        self.tokenizer_path, self.vocab, self.engine = build_tokenizer(self.work, self.data, self.units, self.offsets)
        self.token_dtype = "uint16" if self.vocab <= 65536 else "uint32"

    def tokenize(self, source: str) -> None:
        root, index = str(self.work.root), {u.id: k for k, u in enumerate(self.units)}
        units = [u for u in self.units if u.source == source]
        args = lambda u: (  # noqa: E731
            root,
            u.id,
            str(self.tokenizer_path),
            self.engine,
            int(self.offsets[index[u.id]]),
            self.kept[index[u.id]],
            self.token_dtype,
        )
        st = self.stats[source]
        fields = ("train_docs", "valid_docs", "train_tokens", "valid_tokens")
        totals = dict.fromkeys(fields, 0)  # recomputed on every call, so a retried task does not count twice
        for r in run_units(f"tokenize {source}", units, tokenize_unit, args, self.pool, self.progress):
            for k in fields:
                totals[k] += r[k]
        for k in fields:
            setattr(st, k, totals[k])

    def pack(self, source: str) -> None:
        from opt.data.build import pack_source

        pack_source(self.work, source, [u for u in self.units if u.source == source], self.data.seq_len, self.token_dtype)

    def publish(self) -> DatasetManifest:
        from opt.data.build import publish

        return publish(self.work, self.data, self.id, self.uri, self.inputs, self.stats, self.vocab, self.token_dtype,
                       self.units, self.extra_quarantine, self.near)  # fmt: skip


def prepare_dataset(
    data: DataConfig, store_root: str, work_root: str | Path | None = None, progress: bool = False
) -> tuple[DatasetManifest, bool]:
    """Build (or reuse) the dataset for `data` under `<store_root>/datasets/<id>/`; returns (manifest, reused)."""
    build = DatasetBuild(data, store_root, Path(work_root) if work_root else None, progress)
    existing = build.existing()
    if existing is not None:
        log.info("dataset %s already prepared at %s; reusing it", build.id, build.uri)
        return existing, True
    try:
        for name in build.sources:
            build.clean(name)
        build.dedup()
        build.tokenizer()
        for name in build.sources:
            build.tokenize(name)
            build.pack(name)
        return build.publish(), False
    finally:
        build.close()
