"""The `schedule` section: the Prefect deployments `optctl deploy` registers, and when each one runs."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_CRON_VALUE = r"([0-9]{1,2}|[A-Za-z]{3})"  # a number, or a month or weekday name (jan, mon)
_CRON_ITEM = rf"(\*|{_CRON_VALUE}(-{_CRON_VALUE})?)(/[0-9]+)?"
_CRON_FIELD = re.compile(rf"{_CRON_ITEM}(,{_CRON_ITEM})*")


class Cadence(BaseModel):
    """When one deployment runs: a cron line or an interval (not both), in a time zone; `active: false` registers it paused."""

    model_config = ConfigDict(extra="forbid")

    cron: str | None = None
    interval_s: float | None = Field(None, gt=0)
    timezone: str = "UTC"
    active: bool = True

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        # the shape only (Prefect is too heavy to import for every config load); `optctl deploy` has Prefect's own parser check it
        fields = v.split()
        if not (v in _CRON_ALIASES or (len(fields) == 5 and all(_CRON_FIELD.fullmatch(f) for f in fields))):
            raise ValueError(f"{v!r} is not a cron line (five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *')")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. UTC, Europe/Paris)") from None
        return v

    @model_validator(mode="after")
    def _one(self) -> Cadence:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("give exactly one of cron or interval_s")
        return self

    def describe(self) -> str:
        when = f"cron {self.cron!r} ({self.timezone})" if self.cron else f"every {self.interval_s:g} s"
        return when if self.active else f"{when}, paused"


class ScheduleConfig(BaseModel):
    """Scheduled operation (flows/deployments.py): what runs unattended, how often, and what a person decides."""

    model_config = ConfigDict(extra="forbid")

    work_pool: str = Field("opt-process", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The Prefect work pool (type `process`) the deployments run in; `optctl deploy` creates it when missing."""
    pipeline: Cadence = Cadence(cron="0 2 * * *")
    """Continue training the configured run, then evaluate, gate, register and ask a reviewer (nightly)."""
    pipeline_steps: int = Field(1000, ge=1)
    """Each scheduled pipeline run trains this many steps past the run's newest committed checkpoint."""
    pipeline_retries: int = Field(1, ge=0)
    """A failed scheduled pipeline run is retried this many times (it resumes from the newest checkpoint)."""
    retry_delay_s: int = Field(300, ge=0)
    collision: Literal["cancel_new", "enqueue"] = "cancel_new"
    """What a pipeline run that is due while the previous one still runs does: `cancel_new` (it is cancelled, and
    says so in the UI: the one running is already making that progress) or `enqueue` (it waits, then runs)."""
    checkpoint_eval: Cadence = Cadence(interval_s=1800)
    """Evaluate committed checkpoints of the run that have no evaluation yet."""
    checkpoint_eval_every: int = Field(1, ge=1)
    """Every N-th committed checkpoint (the newest always)."""
    data_refresh: Cadence = Cadence(cron="0 1 * * *")
    """Prepare the dataset again when the sources' content changed (a new dataset id); nothing otherwise."""
    access_housekeeping: Cadence = Cadence(cron="30 6 * * *")
    """Record expired grants, remind reviewers of requests waiting too long, verify the audit chain, report."""
    remind_after_hours: float = Field(48.0, gt=0)
    """A pending access request older than this is in the reviewers' reminder."""
    require_approval: bool = True
    """A scheduled version that passes its gates waits for a reviewer before it becomes `champion`."""
    approval_timeout_s: int = Field(3 * 24 * 3600, ge=1)
    """How long the pipeline waits for the decision; then the version stays `candidate`, and the run says so."""
    approval_poll_s: int = Field(10, ge=1)
    """How often the waiting pipeline looks for the decision."""

    @model_validator(mode="before")
    @classmethod
    def _keep_default_times(cls, data: Any) -> Any:
        """`--set schedule.data_refresh.active=false` pauses the default cadence instead of leaving it with no time."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, f in cls.model_fields.items():
            given = out.get(name)
            if isinstance(given, dict) and "cron" not in given and "interval_s" not in given and isinstance(f.default, Cadence):
                out[name] = {"cron": f.default.cron, "interval_s": f.default.interval_s, **given}
        return out
