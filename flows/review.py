"""The reviewer's decision as a Prefect pause: the version waits, typed form in the UI or `optctl review`.

`await_review` runs inside a flow (the scheduled pipeline, or the `opt-review` flow below, which asks for the
review of a candidate again, e.g. after a timeout). Prefect releases the deployment's concurrency slot while
the run is paused, so a long review never holds back the next scheduled training run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run

from opt.config import RunConfig, load_config
from opt.ops import review
from opt.registry.mlflow_registry import RegistryError, version_info


def await_review(cfg: RunConfig, version: str) -> dict[str, Any]:
    """Pause the current flow run until a reviewer decides on `version` (or the timeout passes), and record it."""
    logger = get_run_logger()
    name, s = cfg.model_name, cfg.schedule
    flow_run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    review.mark_pending(cfg.tracking.uri, name, version, flow_run_id)
    logger.info("%s v%s passed its gates and waits for a reviewer: resume this run in the UI, or `optctl review approve|reject "
                "%s %s --reason ...` (timeout %d s)", name, version, name, version, s.approval_timeout_s)  # fmt: skip
    try:
        decision = pause_flow_run(wait_for_input=review.ReviewDecision, timeout=s.approval_timeout_s, poll_interval=s.approval_poll_s)
    except FlowPauseTimeout:
        entry = review.record(cfg.tracking.uri, name, version, "timed_out", "schedule", f"no decision within {s.approval_timeout_s} s",
                              flow_run_id)  # fmt: skip
        logger.warning("no review of %s v%s within %d s: it stays a candidate (`optctl registry promote` or the opt-review "
                       "deployment can still decide)", name, version, s.approval_timeout_s)  # fmt: skip
        return entry
    outcome = "approved" if decision.decision == "approve" else "rejected"
    entry = review.record(cfg.tracking.uri, name, version, outcome, decision.reviewer, decision.reason, flow_run_id, cfg.access)
    logger.info("%s v%s %s by %s: %s", name, version, outcome, decision.reviewer, decision.reason)
    return entry


@flow(name="opt-review", log_prints=True)
def review_flow(version: str, config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Ask a reviewer to decide on a candidate version (one that passed its gates) of the configured model."""
    cfg = load_config(config_path, overrides or [])
    info = version_info(cfg.tracking.uri, cfg.model_name, version)
    if info["tags"].get("opt.gate") != "passed":
        raise RegistryError(f"{cfg.model_name} v{version} did not pass its gates: there is nothing to review")
    return await_review(cfg, version)
