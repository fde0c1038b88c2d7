"""The flows the deployments run on their schedules (flows/deployments.py declares the deployments).

- `opt-scheduled-pipeline`: train the configured run `schedule.pipeline_steps` further (never past
  `train.max_steps`, whose learning-rate schedule it keeps), evaluate, gate, register, and wait for a reviewer.
  A retried or later run starts from the newest committed checkpoint, reuses the dataset, the evaluation of a
  step already evaluated and the version of a step already registered: work done is never done again.
- `opt-checkpoint-eval`: evaluate the run's committed checkpoints that have no evaluation yet.
- `opt-data-refresh`: prepare the dataset again only when the sources' content changed (a new dataset id).
- `opt-access-housekeeping`: expire grants, remind reviewers, verify the audit chain; a report as an artifact.
Each only orchestrates: the work is in `opt.stages`, `opt.ops` and `opt.access`.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, RUN_ID

from flows.pipeline import evaluate, prepare_data, register, train
from flows.review import await_review
from opt import stages
from opt.config import RunConfig, load_config


@task(name="plan-segment", cache_policy=INPUTS + RUN_ID, persist_result=True)
def plan_segment(cfg: dict[str, Any]) -> dict[str, int]:
    """The step this run trains to, fixed once per flow run (a retry of the same run trains to the same step)."""
    c = RunConfig.model_validate(cfg)
    from opt.train.checkpoint import latest_committed
    from opt.train.job import run_uri

    newest = latest_committed(run_uri(c))
    start = newest.step if newest is not None else 0
    return {"from": start, "to": min(c.train.max_steps, start + c.schedule.pipeline_steps)}


@task(name="evaluate-once", cache_policy=NO_CACHE)
def evaluate_once(cfg: dict[str, Any], step: int, manifest_json: str) -> dict[str, Any]:
    """The step's evaluation: the one already written beside its checkpoint, or a new one."""
    from opt import storage
    from opt.eval.report import EVAL_FILE

    c = RunConfig.model_validate(cfg)
    done = storage.join(stages.checkpoint(c, step).uri, EVAL_FILE)
    if storage.exists(done):
        get_run_logger().info("step %d is evaluated already (%s)", step, done)
        return dict(json.loads(storage.read_text(done)))
    return dict(evaluate.fn(cfg, step, manifest_json))


@flow(name="opt-scheduled-pipeline", log_prints=True)
def scheduled_pipeline(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """One scheduled segment of the configured run: train further, evaluate, gate, register, review."""
    logger = get_run_logger()
    cfg = load_config(config_path, overrides or [])
    segment = plan_segment(cfg.model_dump(mode="json"))
    if segment["from"] >= cfg.train.max_steps:
        logger.info("run %s is complete (step %d of %d): nothing to train", cfg.train.run, segment["from"], cfg.train.max_steps)
    seg_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stop_at_step": segment["to"]})})
    data = seg_cfg.model_dump(mode="json")
    prepared = prepare_data(data)
    trained = train(data, prepared["manifest"])
    report = evaluate_once(data, trained["step"], prepared["manifest"])
    registration = register(data, trained["step"])
    summary: dict[str, Any] = {"segment": segment, "train": trained, "perplexity": report["perplexity"], "registration": registration}
    already = "champion" in registration["aliases"] or registration["reused"]
    if registration["gate_passed"] and cfg.schedule.require_approval and not already:
        summary["review"] = await_review(cfg, registration["version"])
    elif not registration["gate_passed"]:
        logger.warning("%s v%s failed its gates: %s", registration["name"], registration["version"], "; ".join(registration["reasons"]))
    return summary


@flow(name="opt-checkpoint-eval", log_prints=True)
def checkpoint_eval(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate committed checkpoints of the configured run that have no evaluation yet."""
    cfg = load_config(config_path, overrides or [])
    try:
        reports = stages.evaluate_pending(cfg, cfg.schedule.checkpoint_eval_every)
    except stages.StageError as e:  # the run has not started: nothing to evaluate is not a failure
        get_run_logger().info("nothing to evaluate: %s", e)
        return {"evaluated": []}
    evaluated = [{"step": r.step, "perplexity": r.perplexity} for r in reports]
    get_run_logger().info("evaluated %d checkpoint(s) of run %s: %s", len(evaluated), cfg.train.run, evaluated or "none pending")
    return {"evaluated": evaluated}


@flow(name="opt-data-refresh", log_prints=True)
def data_refresh(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Prepare the dataset when the sources' content changed; a no-op when the dataset id already exists."""
    from opt.data.prep import DatasetBuild

    cfg = load_config(config_path, overrides or [])
    existing = DatasetBuild(cfg.data, cfg.storage.root).existing()
    if existing is not None:
        get_run_logger().info("sources unchanged: dataset %s is current (%s)", existing.dataset_id, existing.uri)
        return {"dataset_id": existing.dataset_id, "changed": False}
    from flows.data_prep import data_prep

    result = data_prep(config_path, overrides)
    get_run_logger().info("sources changed: prepared dataset %s", result["dataset_id"])
    return {"dataset_id": result["dataset_id"], "changed": True}


@flow(name="opt-access-housekeeping", log_prints=True)
def access_housekeeping(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Record expired grants, remind reviewers of requests waiting too long, verify the audit chain."""
    from opt.access.housekeeping import run_housekeeping
    from opt.access.server import build_service
    from opt.errors import OptError

    cfg = load_config(config_path, overrides or [])
    service = build_service(cfg.access)
    try:
        report = run_housekeeping(service, cfg.schedule.remind_after_hours)
    finally:
        service.close()
    create_markdown_artifact(report.markdown(), key="access-housekeeping", description="expired grants, waiting requests, audit chain")
    logger = get_run_logger()
    for w in report.waiting:
        logger.warning("request %d by %s for %s v%s has waited %.0f h for a reviewer", w["id"], w["requester"], w["model"],
                       w["version"], w["hours"])  # fmt: skip
    if not report.chain_ok:
        raise OptError(f"the access audit chain is broken: {report.chain_problem}; see `optctl access audit verify`")
    logger.info("%d grant(s) expired, %d request(s) waiting too long, audit chain intact (%d entries)", len(report.expired),
                len(report.waiting), report.chain_entries)  # fmt: skip
    return report.to_dict()
