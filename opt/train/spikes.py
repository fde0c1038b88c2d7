"""Loss-spike detection and the rollback bookkeeping that OPT-175B's engineers did by hand.

A step is a spike when its loss or gradient norm is not finite, or (after a warm-up) its loss exceeds
`ratio` times the running average. The trainer then rolls back to the newest good checkpoint, skips the
data window that led to the spike, lowers the LR by `lr_factor`, and gives up after `max_rollbacks`.

`SpikeState` travels in every checkpoint (trainer.json), so a resumed run makes the same decisions and
reads the same data as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from opt.config import SpikeConfig


@dataclass(frozen=True)
class SpikeState:
    loss_avg: float | None = None
    """Running average of the loss (None before the first step)."""
    steps_seen: int = 0
    data_offset: int = 0
    """Data steps skipped so far: training step s reads data step s + data_offset."""
    lr_scale: float = 1.0
    rollbacks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SpikeState:
        return cls(**d) if d else cls()


def spike_reason(cfg: SpikeConfig, state: SpikeState, loss: float, grad_norm: float) -> str | None:
    """Why this step is a spike, or None if it is healthy."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    avg = state.loss_avg
    if state.steps_seen >= cfg.warmup_steps and avg is not None and loss > cfg.ratio * avg:
        return f"loss {loss:.4g} is {loss / avg:.1f}x its running average {avg:.4g} (limit {cfg.ratio}x)"
    return None


def observe(cfg: SpikeConfig, state: SpikeState, loss: float) -> SpikeState:
    """The state after a healthy step with this loss."""
    avg = loss if state.loss_avg is None else cfg.ema * state.loss_avg + (1 - cfg.ema) * loss
    return replace(state, loss_avg=avg, steps_seen=state.steps_seen + 1)


def after_rollback(cfg: SpikeConfig, restored: SpikeState, current: SpikeState, restored_step: int, spike_step: int) -> SpikeState:
    """State to continue from `restored_step` (the checkpoint's) after a spike at training step `spike_step`.

    The running average comes from the checkpoint; the skip, LR scale and rollback count carry on from
    `current`. Data steps from the checkpoint up to and including the spike's are skipped: the run goes
    on from step `restored_step` reading data step `spike data step + 1`.
    """
    spike_data_step = spike_step + current.data_offset
    return replace(
        restored,
        data_offset=spike_data_step + 1 - restored_step,
        lr_scale=current.lr_scale * cfg.lr_factor,
        rollbacks=current.rollbacks + 1,
    )
