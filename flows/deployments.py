"""Every Prefect deployment of the platform, declared in this one place; `optctl deploy` registers them.

Each deployment runs a flow of flows/scheduled.py (or flows/review.py) on its `schedule.*` cadence, in a
`process` work pool that a worker (`prefect worker start --pool <schedule.work_pool>`) serves, with the config
file and overrides it was deployed with, in the folder it was deployed from (relative paths in the config
resolve there, as they do for `optctl`).

Concurrency: each deployment allows one run at a time. A pipeline run that comes due while the previous one
still runs is cancelled (`schedule.collision: cancel_new`, the default: the run in progress is already making
that progress, and a queue would pile up after an outage) or waits its turn (`enqueue`). Beneath it, the
trainer's run lease refuses a second trainer of the same run from anywhere (another deployment, a person).
A paused run (waiting for a reviewer) holds no slot.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opt.config import RunConfig
from opt.ops.config import Cadence


@dataclass(frozen=True)
class Planned:
    """One deployment as `optctl deploy` registers it."""

    name: str
    flow: str  # module path of the flow object
    cadence: Cadence | None  # None: run on demand only (the review flow)
    description: str


def planned(cfg: RunConfig) -> list[Planned]:
    s, run = cfg.schedule, cfg.train.run
    return [
        Planned(f"pipeline-{run}", "flows.scheduled.scheduled_pipeline", s.pipeline,
                f"train run {run} {s.pipeline_steps} steps further, evaluate, gate, register, wait for a reviewer"),
        Planned(f"checkpoint-eval-{run}", "flows.scheduled.checkpoint_eval", s.checkpoint_eval,
                f"evaluate run {run}'s committed checkpoints that have no evaluation yet"),
        Planned("data-refresh", "flows.scheduled.data_refresh", s.data_refresh,
                "prepare the dataset again when the sources' content changed"),
        Planned("access-housekeeping", "flows.scheduled.access_housekeeping", s.access_housekeeping,
                "expire grants, remind reviewers of waiting requests, verify the audit chain"),
        Planned(f"review-{cfg.model_name}", "flows.review.review_flow", None,
                f"ask a reviewer to decide on a version of {cfg.model_name} (parameter: version)"),
    ]  # fmt: skip


def _schedule(c: Cadence) -> Any:
    from prefect.schedules import Cron, Interval

    if c.cron is not None:
        return Cron(c.cron, timezone=c.timezone, active=c.active)
    return Interval(float(c.interval_s or 0), timezone=c.timezone, active=c.active)


def _flow(path: str) -> Any:
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def ensure_pool(name: str) -> None:
    """Create the `process` work pool when it does not exist (an existing one is left as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # created meanwhile by another deploy
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return
    if pool.type != "process":
        from opt.errors import OptError

        raise OptError(f"work pool {name!r} is of type {pool.type!r}, not process; set schedule.work_pool to another name")


def deploy(cfg: RunConfig, config_path: str | None, overrides: list[str], workdir: Path) -> list[dict[str, Any]]:
    """Register every deployment with its schedule against the server at PREFECT_API_URL; returns what was registered."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    s = cfg.schedule
    ensure_pool(s.work_pool)
    strategy = ConcurrencyLimitStrategy.CANCEL_NEW if s.collision == "cancel_new" else ConcurrencyLimitStrategy.ENQUEUE
    params = {"config_path": str(Path(config_path).resolve()) if config_path else None, "overrides": list(overrides)}
    out = []
    for p in planned(cfg):
        env = {"PREFECT_FLOWS_DEFAULT_RETRIES": str(s.pipeline_retries), "PREFECT_FLOWS_DEFAULT_RETRY_DELAY_SECONDS": str(s.retry_delay_s)}
        deployment = _flow(p.flow).to_deployment(
            name=p.name,
            description=p.description,
            schedules=[_schedule(p.cadence)] if p.cadence else [],
            parameters=params,
            # reviews of different versions may wait side by side; everything else runs one at a time
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy) if p.cadence else None,
            job_variables={"working_dir": str(workdir), **({"env": env} if p.name.startswith("pipeline-") else {})},
            tags=["opt", f"run:{cfg.train.run}"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        deployment_id = deployment.apply(work_pool_name=s.work_pool)
        out.append({"name": f"{_flow(p.flow).name}/{p.name}", "id": str(deployment_id),
                    "schedule": p.cadence.describe() if p.cadence else "on demand"})  # fmt: skip
    return out
