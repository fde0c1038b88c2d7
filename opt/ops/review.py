"""A person in the loop: a version that passed its gates waits for a reviewer before it becomes `champion`.

The waiting is Prefect's (a pause with the ReviewDecision form, in flows/review.py): the reviewer
answers the typed form in the Prefect UI, or `optctl review approve|reject NAME VERSION --reason ...`, which
finds the waiting flow run from the version's `opt.review_pending` tag and resumes it with the same input.
Prefect's open-source server has no user accounts, so the form asks who decides. Every outcome (approved,
rejected, timed out) is the version's `opt.review` tag (JSON: decision, by, at, reason, flow run) and a
`review` event in its training run's logbook; an approval promotes the version to `champion` (opt/registry/promote.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from opt.errors import OptError

PENDING_TAG = "opt.review_pending"
"""On a version waiting for review: the id of the Prefect flow run that waits."""
REVIEW_TAG = "opt.review"


class ReviewError(OptError):
    """A review that cannot be given: nothing waits, or the decision is malformed."""


class ReviewDecision(BaseModel):
    """The form the reviewer fills in (Prefect renders it from this schema)."""

    decision: Literal["approve", "reject"] = Field(description="approve: the version becomes champion; reject: it stays a candidate")
    reviewer: str = Field(min_length=1, max_length=100, description="who decides (your name or login)")
    reason: str = Field(min_length=1, max_length=2000, description="why: what you checked, what you found")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def mark_pending(tracking_uri: str, name: str, version: str, flow_run_id: str) -> None:
    from opt.tracking import client

    client(tracking_uri).set_model_version_tag(name, version, PENDING_TAG, flow_run_id)


def record(tracking_uri: str, name: str, version: str, outcome: str, by: str, reason: str, flow_run_id: str | None,
           access_cfg: Any = None) -> dict[str, Any]:  # fmt: skip
    """Record a review outcome (approved, rejected, timed_out) on the version and in its run's logbook; promote on approval."""
    from opt.registry.mlflow_registry import CHAMPION, version_info
    from opt.tracking import client

    info = version_info(tracking_uri, name, version)
    entry = {"decision": outcome, "by": by, "at": _now(), "reason": reason, "flow_run": flow_run_id}
    c = client(tracking_uri)
    c.set_model_version_tag(name, version, REVIEW_TAG, json.dumps(entry, sort_keys=True))
    if PENDING_TAG in info["tags"]:
        c.delete_model_version_tag(name, version, PENDING_TAG)
    run_uri = info["tags"].get("opt.checkpoint_uri", "").rsplit("/step-", 1)[0]
    if run_uri:
        from opt.logbook import Logbook

        Logbook(run_uri).append("review", model=name, version=version, **entry)
    if outcome == "approved":
        from opt.registry.promote import promote

        promote(tracking_uri, name, version, CHAMPION, f"approved in review: {reason}", actor=by, access_cfg=access_cfg)
    return entry


def waiting(tracking_uri: str, name: str) -> list[dict[str, str]]:
    """Versions of `name` waiting for a review, oldest first: version, step, perplexity, flow run id."""
    from opt.tracking import client

    try:
        versions = client(tracking_uri).search_model_versions(f"name = '{name}'")
    except Exception as e:
        raise ReviewError(f"cannot read the registry at {tracking_uri}: {str(e).splitlines()[0]}") from None
    out = [
        {"version": str(v.version), "step": v.tags.get("opt.step", ""), "perplexity": v.tags.get("opt.eval_perplexity", ""),
         "flow_run": v.tags[PENDING_TAG]}
        for v in versions if PENDING_TAG in (v.tags or {})
    ]  # fmt: skip
    return sorted(out, key=lambda r: int(r["version"]))
