"""Data preparation as a Prefect flow: one task per source for each stage, retries around I/O.

Every stage is resumable on its own (units record completion with checksums), so a retried task
continues where it stopped, and a dataset that already exists (same dataset id) makes the flow a
no-op: that is the cache, keyed by the dataset id, that the stages need.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from opt.config import load_config
from opt.data.prep import DatasetBuild


@task(name="clean-source", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def clean_source(build: DatasetBuild, source: str) -> int:
    results = build.clean(source)
    return sum(r["kept"] for r in results)


@task(name="deduplicate", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[5])
def deduplicate(build: DatasetBuild) -> None:
    build.dedup()


@task(name="tokenizer", cache_policy=NO_CACHE)
def tokenizer(build: DatasetBuild) -> None:
    build.tokenizer()


@task(name="tokenize-and-pack", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def tokenize_and_pack(build: DatasetBuild, source: str) -> None:
    build.tokenize(source)
    build.pack(source)


@task(name="publish", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def publish(build: DatasetBuild) -> dict[str, Any]:
    return {"dataset_id": build.id, "uri": build.publish().uri, "reused": False}


@flow(name="opt-data-prep", log_prints=True)
def data_prep(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Prepare (or find) the dataset of a configuration; returns its id and URI."""
    cfg = load_config(config_path, overrides or [])
    build = DatasetBuild(cfg.data, cfg.storage.root)
    existing = build.existing()
    if existing is not None:
        get_run_logger().info("dataset %s exists at %s: nothing to do", existing.dataset_id, existing.uri)
        return {"dataset_id": existing.dataset_id, "uri": existing.uri, "reused": True}
    # sources are cleaned one after another: each task already uses every core through the build's process pool
    try:
        for name in build.sources:
            clean_source(build, name)
        deduplicate(build)
        tokenizer(build)
        for name in build.sources:
            tokenize_and_pack(build, name)
        return publish(build)
    finally:
        build.close()
