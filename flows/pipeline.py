"""The end-to-end pipeline as a Prefect flow: data prep -> train -> evaluate -> gated registration.

Tasks take and return plain JSON-able data so Prefect can persist them. Caching is off for the
heavy tasks: data prep is idempotent by dataset id and training resumes by run name, which is the
correct cache for them (Prefect's default key includes the flow-run id and would never hit).
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from opt import stages
from opt.config import RunConfig, load_config
from opt.data.manifest import DatasetManifest

# retries only around I/O-bound stages; a failed training run is resumed by Ray, not re-run by Prefect


@task(name="prepare-data", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def prepare_data(cfg: dict[str, Any]) -> dict[str, Any]:
    manifest, reused = stages.prepare_data(RunConfig.model_validate(cfg))
    get_run_logger().info("dataset %s at %s (%s)", manifest.dataset_id, manifest.uri, "reused" if reused else "prepared")
    return {"manifest": manifest.to_json(), "reused": reused}


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: dict[str, Any], manifest_json: str) -> dict[str, Any]:
    result = stages.train(RunConfig.model_validate(cfg), DatasetManifest.from_json(manifest_json))
    return {
        "run_uri": result.run_uri,
        "mlflow_run_id": result.mlflow_run_id,
        "step": result.checkpoint.step,
        "checkpoint": result.checkpoint.uri,
    }


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: dict[str, Any], step: int, manifest_json: str) -> dict[str, Any]:
    report = stages.evaluate(RunConfig.model_validate(cfg), step, DatasetManifest.from_json(manifest_json))
    return json.loads(report.to_json())


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def register(cfg: dict[str, Any], step: int) -> dict[str, Any]:
    reg = stages.register(RunConfig.model_validate(cfg), step)
    return {"name": reg.name, "version": reg.version, "gate_passed": reg.gate_passed, "reasons": reg.reasons,
            "aliases": reg.aliases, "access_class": reg.access_class, "reused": reg.reused}  # fmt: skip


@flow(name="opt-pipeline", log_prints=True)
def pipeline(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every stage for one configuration; returns a JSON summary of what each stage produced."""
    cfg = load_config(config_path, overrides or []).model_dump(mode="json")
    data = prepare_data(cfg)
    trained = train(cfg, data["manifest"])
    report = evaluate(cfg, trained["step"], data["manifest"])
    registration = register(cfg, trained["step"])
    manifest = json.loads(data["manifest"])
    return {
        "dataset": {"id": manifest["dataset_id"], "uri": manifest["uri"], "reused": data["reused"]},
        "train": trained,
        "eval": {"perplexity": report["perplexity"], "loss": report["loss"], "tokens": report["tokens"], "tasks": report.get("tasks", {})},
        "registration": registration,
    }
