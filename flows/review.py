"""The reviewer's decision as a Prefect pause: the version waits, typed form in the UI or `optctl review`.

`await_review` runs inside a flow (the scheduled pipeline, or the `opt-review` flow below, which asks for the
review of a candidate again, e.g. after a timeout). Prefect releases the deployment's concurrency slot while
the run is paused, so a long review never holds back the next scheduled training run.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.input import keyset_from_paused_state
from prefect.input.run_input import run_input_subclass_from_type
from prefect.states import Paused, Running
from prefect.utilities.engine import propose_state_sync

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
    decision = _pause_for_decision(flow_run_id, s.approval_timeout_s, s.approval_poll_s)
    if decision is None:
        entry = review.record(cfg.tracking.uri, name, version, "timed_out", "schedule", f"no decision within {s.approval_timeout_s} s",
                              flow_run_id)  # fmt: skip
        logger.warning("no review of %s v%s within %d s: it stays a candidate (`optctl registry promote` or the opt-review "
                       "deployment can still decide)", name, version, s.approval_timeout_s)  # fmt: skip
        return entry
    outcome = "approved" if decision.decision == "approve" else "rejected"
    entry = review.record(cfg.tracking.uri, name, version, outcome, decision.reviewer, decision.reason, flow_run_id, cfg.access)
    logger.info("%s v%s %s by %s: %s", name, version, outcome, decision.reviewer, decision.reason)
    return entry


PAUSE_GRACE_S = 24 * 3600
"""Prefect's own pause deadline lies this far past ours: a pause that expires on Prefect's side can only end the run
as Failed ("paused and never resumed"), while a review nobody gave is an outcome, not a failure of the run."""


def _pause_for_decision(flow_run_id: str, timeout_s: int, poll_s: int) -> Any:
    """`pause_flow_run(wait_for_input=ReviewDecision)`, but at our deadline the run resumes itself (returns None)
    instead of failing: the same Paused state, input form and keyset as Prefect's own, so the UI's Resume works."""
    from uuid import UUID

    form = run_input_subclass_from_type(review.ReviewDecision)
    paused: Any = Paused(timeout_seconds=timeout_s + PAUSE_GRACE_S, reschedule=False, pause_key="review")
    keyset: Any = keyset_from_paused_state(paused)
    paused.state_details.run_input_keyset = keyset
    run_id = UUID(flow_run_id)
    with get_client(sync_client=True) as client:
        state = propose_state_sync(client=client, state=paused, flow_run_id=run_id)
        if state.is_running():  # this run was paused and resumed before (a retry of it)
            return form.load(keyset)
        form.save(keyset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(min(poll_s, max(0.1, deadline - time.monotonic())))
            current = client.read_flow_run(run_id).state
            if current is not None and current.is_running():
                return form.load(keyset)
        propose_state_sync(client=client, state=Running(), flow_run_id=run_id)
    from prefect.input.actions import read_flow_run_input

    answered: Any = read_flow_run_input(keyset["response"], flow_run_id=run_id)  # None unless the reviewer answered just now
    return form(**answered) if answered else None


def decide(tracking_uri: str, name: str, version: str, decision: review.ReviewDecision) -> str:
    """Resume the flow run waiting on `name` v`version` with the decision; returns the flow run id."""
    info = version_info(tracking_uri, name, version)
    flow_run_id = info["tags"].get(review.PENDING_TAG)
    if not flow_run_id:
        done = info["tags"].get(review.REVIEW_TAG)
        said = f"; its review: {json.loads(done)['decision']}" if done else ""
        raise review.ReviewError(f"{name} v{version} is not waiting for a review{said} (`optctl review list` shows the ones that are)")
    from uuid import UUID

    from prefect.exceptions import ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    try:
        with get_client(sync_client=True) as pc:
            state = pc.read_flow_run(UUID(flow_run_id)).state
    except ObjectNotFound:
        raise review.ReviewError(f"the flow run {flow_run_id} that waited on {name} v{version} is gone from this Prefect server") from None
    except Exception as e:
        raise review.ReviewError(f"cannot reach the Prefect server (PREFECT_API_URL): {str(e).splitlines()[0]}") from None
    if state is None or not state.is_paused():
        raise review.ReviewError(
            f"the flow run {flow_run_id} of {name} v{version} no longer waits (it is {state.name if state else 'unknown'})"
        )
    resume_flow_run(UUID(flow_run_id), run_input=decision.model_dump())
    return flow_run_id


@flow(name="opt-review", log_prints=True)
def review_flow(version: str, config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Ask a reviewer to decide on a candidate version (one that passed its gates) of the configured model."""
    cfg = load_config(config_path, overrides or [])
    info = version_info(cfg.tracking.uri, cfg.model_name, version)
    if info["tags"].get("opt.gate") != "passed":
        raise RegistryError(f"{cfg.model_name} v{version} did not pass its gates: there is nothing to review")
    return await_review(cfg, version)
