"""The five stages as plain functions of the run configuration, shared by `optctl` and the Prefect flow.

Each stage finds its inputs through the contracts in docs/architecture.md (dataset id, run name,
newest committed checkpoint), so each can run alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opt import storage
from opt.config import RunConfig
from opt.data.manifest import DatasetManifest, load_manifest
from opt.errors import OptError
from opt.eval.report import EVAL_FILE, EvalReport
from opt.train.checkpoint import CommittedCheckpoint, latest_committed, step_uri, verify
from opt.train.job import RUN_FILE, TrainResult, run_uri, work_dir

if TYPE_CHECKING:  # torch and mlflow load only when a stage needs them
    from opt.registry.mlflow_registry import Registration

log = logging.getLogger(__name__)


class StageError(OptError):
    """A stage whose inputs are missing: the message names the stage to run first."""


@dataclass
class PipelineSummary:
    dataset: DatasetManifest
    dataset_reused: bool
    train: TrainResult
    eval: EvalReport
    registration: Registration


def prepare_data(cfg: RunConfig, progress: bool = False) -> tuple[DatasetManifest, bool]:
    from opt.data.prep import prepare_dataset

    manifest, reused = prepare_dataset(cfg.data, cfg.storage.root, progress=progress)
    log.info("data prep: dataset %s %s (%s training tokens)", manifest.dataset_id, "reused" if reused else "prepared",
             f"{manifest.train_tokens:,}")  # fmt: skip
    return manifest, reused


def find_dataset(cfg: RunConfig) -> DatasetManifest:
    """The prepared dataset for this config (same inputs and data settings), or StageError."""
    from opt.data.prep import dataset_id, list_inputs, work_home

    # the same input-hash cache as data prep, so a standalone `optctl train` does not re-hash the corpus
    did, _ = dataset_id(cfg.data, list_inputs(cfg.data, work_home() / "input-hashes.json"))
    uri = storage.join(cfg.storage.root, "datasets", did)
    try:
        return load_manifest(uri)
    except OptError:
        raise StageError(f"dataset {did} is not prepared at {uri}; run `optctl data prep` with the same config first") from None


def train(cfg: RunConfig, manifest: DatasetManifest | None = None) -> TrainResult:
    from opt.train.job import train as run_training

    log.info("training: run %s to step %d on %d workers", cfg.train.run, cfg.train.max_steps, cfg.train.num_workers)
    result = run_training(cfg, manifest or find_dataset(cfg))
    log.info("training: run %s committed step %d", cfg.train.run, result.checkpoint.step)
    return result


def _run_record(cfg: RunConfig) -> dict:
    uri = storage.join(run_uri(cfg), RUN_FILE)
    if not storage.exists(uri):
        raise StageError(f"run {cfg.train.run!r} has not been trained (no {uri}); run `optctl train` first")
    return json.loads(storage.read_text(uri))


def checkpoint(cfg: RunConfig, step: int | None = None) -> CommittedCheckpoint:
    """The newest committed checkpoint of the run, or the one at `step` (verified)."""
    if step is not None:
        from opt.train.checkpoint import committed_steps

        steps = sorted(committed_steps(run_uri(cfg)))
        if step not in steps:
            have = f"its committed steps: {', '.join(map(str, steps))}" if steps else "it has no committed checkpoint yet"
            raise StageError(f"run {cfg.train.run!r} has no committed checkpoint at step {step}; {have}")
        try:
            return verify(step_uri(run_uri(cfg), step))
        except (OSError, ValueError, KeyError) as e:
            raise StageError(f"run {cfg.train.run!r}: the checkpoint at step {step} does not verify ({e}); choose another of "
                             f"its committed steps: {', '.join(map(str, steps))}") from None  # fmt: skip
    ckpt = latest_committed(run_uri(cfg))
    if ckpt is None:
        raise StageError(f"run {cfg.train.run!r} has no committed checkpoint; run `optctl train` first")
    return ckpt


def evaluate(cfg: RunConfig, step: int | None = None, manifest: DatasetManifest | None = None) -> EvalReport:
    from opt.eval.perplexity import TaskRun, log_to_mlflow
    from opt.eval.perplexity import evaluate as run_eval

    record = _run_record(cfg)
    ckpt = checkpoint(cfg, step)
    manifest = manifest or load_manifest(storage.join(cfg.storage.root, "datasets", record["dataset_id"]))
    e = cfg.eval
    tasks = TaskRun(e.task_names(cfg.model.preset), e.include_path, e.num_fewshot, e.limit, e.batch_tokens)
    log.info("evaluation: step %d (perplexity per source%s)", ckpt.step, f"; tasks {', '.join(tasks.names)}" if tasks.names else "")
    report = run_eval(ckpt, manifest, work_dir(cfg) / "cache", e.batch_size, e.max_batches, tasks)
    log_to_mlflow(report, cfg.tracking.uri, record["mlflow_run_id"])
    return report


def evaluate_pending(cfg: RunConfig, every: int = 1) -> list[EvalReport]:
    """Evaluate the run's committed checkpoints that have no `eval.json` yet, every `every`-th one (oldest first).

    This runs beside training, never inside it (`optctl eval pending [--watch S]`, or a scheduled flow): the
    training loop only commits checkpoints, and the figures reach the training run in MLflow against their step.
    """
    from opt.train.checkpoint import committed_steps

    if every < 1:
        raise StageError(f"--every must be at least 1, got {every}")
    record = _run_record(cfg)
    manifest = load_manifest(storage.join(cfg.storage.root, "datasets", record["dataset_id"]))
    steps = sorted(committed_steps(run_uri(cfg)))
    chosen = [s for i, s in enumerate(steps) if i % every == 0 or s == steps[-1]]
    reports = []
    for step in chosen:
        if not storage.exists(storage.join(step_uri(run_uri(cfg), step), EVAL_FILE)):
            reports.append(evaluate(cfg, step, manifest))
    return reports


def register(cfg: RunConfig, step: int | None = None) -> Registration:
    from opt.registry.mlflow_registry import register as run_register

    record = _run_record(cfg)
    ckpt = checkpoint(cfg, step)
    manifest = load_manifest(storage.join(cfg.storage.root, "datasets", record["dataset_id"]))
    eval_uri = storage.join(ckpt.uri, EVAL_FILE)
    if not storage.exists(eval_uri):
        raise StageError(f"checkpoint {ckpt.uri} has not been evaluated; run `optctl eval` first")
    report = EvalReport(**json.loads(storage.read_text(eval_uri)))
    log.info("registration: step %d of run %s as %s", ckpt.step, cfg.train.run, cfg.model_name)
    return run_register(cfg, ckpt, manifest, report, record["mlflow_run_id"], work_dir(cfg))


def run_all(cfg: RunConfig) -> PipelineSummary:
    """All stages in order without Prefect (the flow in flows/pipeline.py is the orchestrated form)."""
    manifest, reused = prepare_data(cfg)
    result = train(cfg, manifest)
    report = evaluate(cfg, result.checkpoint.step, manifest)
    return PipelineSummary(manifest, reused, result, report, register(cfg, result.checkpoint.step))
