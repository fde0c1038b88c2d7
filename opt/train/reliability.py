"""Failures, checkpoint interval and goodput at a scale we cannot run here (OPT-175B on 992 A100s).

OPT's logbook records 35 manual and 70+ automatic restarts in about two months: at that scale a host
fails every few hours, and every failure throws away the work since the last committed checkpoint.
Checkpointing more often loses less per failure but spends more time writing. This module picks the
interval that balances the two (Young 1974, Daly 2006), gives Daly's closed-form goodput, and checks
it with a Monte Carlo simulation of the same failure model.

Model (Daly's): failures are a Poisson process with mean time between failures M over the whole job,
including checkpoint writes and restarts. Compute runs in segments of `interval` seconds, each followed
by a checkpoint write of `checkpoint` seconds; a checkpoint counts only once written. A failure loses
the segment in progress, then the job pays `restart` seconds (which a failure can also interrupt) and
resumes from the last committed checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from opt.config import RunConfig
from opt.model.plan import BYTES_PER_PARAM, count_params, train_flops_per_token
from opt.train.recipe import resolve

DAY_S = 86_400.0
# OPT-175B's cluster (paper section 2.5, logbook): 992 80GB A100s on 124 hosts of 8.
OPT175B_HOSTS = 124
OPT175B_GPUS_PER_HOST = 8
# The logbook's "about 2 host failures per day" across the 124 hosts, as a per-host rate, so that
# planning for another host count scales the cluster's failure rate with it.
OPT175B_HOST_FAILURES_PER_DAY = 2.0 / OPT175B_HOSTS
# Detecting a dead host, replacing it and reloading the checkpoint: about 10 minutes when automatic.
OPT175B_RESTART_S = 600.0
# A100 dense bf16 peak (datasheet); OPT reports 147 TFLOP/s per GPU, i.e. ~47% MFU, so 0.45 is close.
A100_PEAK_TFLOPS = 312.0
OPT175B_MFU = 0.45
# Aggregate checkpoint write bandwidth per host to shared storage: a conservative 1 GB/s (blob store).
WRITE_GB_PER_S_PER_HOST = 1.0
# What a resumable checkpoint holds per parameter: bf16 weights (2) + fp32 master weights, Adam m and
# v (12) = 14 bytes. Gradients (the other 2 of training's 16) are recomputed, not saved.
CHECKPOINT_BYTES_PER_PARAM = BYTES_PER_PARAM["weights"] + BYTES_PER_PARAM["optimizer"]


def _positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0 or not math.isfinite(v):  # `not v > 0` also catches NaN
            raise ValueError(f"{name} must be a positive finite number, got {v}")


def _non_negative(**values: float) -> None:
    for name, v in values.items():
        if not v >= 0 or not math.isfinite(v):
            raise ValueError(f"{name} must be a non-negative finite number, got {v}")


def young_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's (1974) first-order optimum compute time between checkpoints: sqrt(2 * delta * M)."""
    _positive(checkpoint_s=checkpoint_s, mtbf_s=mtbf_s)
    return math.sqrt(2 * checkpoint_s * mtbf_s)


def young_daly_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly's (2006, FGCS 22:303) higher-order optimum compute time between checkpoints.

    Young's sqrt(2*delta*M) with Daly's correction terms, which matter once the checkpoint cost is not
    small next to the MTBF; when a checkpoint takes 2M or more, checkpointing every M is the best left.
    """
    _positive(checkpoint_s=checkpoint_s, mtbf_s=mtbf_s)
    d, m = checkpoint_s, mtbf_s
    if d >= 2 * m:
        return m
    x = d / (2 * m)
    return math.sqrt(2 * d * m) * (1 + math.sqrt(x) / 3 + x / 9) - d


def expected_goodput(interval_s: float, checkpoint_s: float, restart_s: float, mtbf_s: float) -> float:
    """Fraction of wall time that is useful compute, Daly's closed form: tau / (M e^(R/M) (e^((tau+delta)/M) - 1)).

    A segment of tau + delta seconds takes M e^(R/M) (e^((tau+delta)/M) - 1) seconds on average once
    failures (each costing the lost part of the segment plus a restart that can itself fail) are counted.
    """
    _positive(interval_s=interval_s, checkpoint_s=checkpoint_s, mtbf_s=mtbf_s)
    _non_negative(restart_s=restart_s)
    m = mtbf_s
    return interval_s / (m * math.exp(restart_s / m) * math.expm1((interval_s + checkpoint_s) / m))


@dataclass(frozen=True)
class SimResult:
    """Monte Carlo outcome over `trials` independent runs of the same job."""

    trials: int
    goodput_mean: float
    """Mean over trials of useful compute / wall time."""
    goodput_lo: float
    """2.5th percentile of goodput across trials."""
    goodput_hi: float
    """97.5th percentile of goodput across trials."""
    failures_mean: float
    wall_s_mean: float


def simulate(
    interval_s: float, checkpoint_s: float, restart_s: float, mtbf_s: float, work_s: float, trials: int = 1000, seed: int = 0
) -> SimResult:
    """Simulate `trials` runs of `work_s` seconds of compute under Poisson failures (see the module docstring).

    Vectorised over trials; each loop iteration advances every unfinished trial to its next failure (or
    to the end of its restart), so the loop runs about as many times as the unluckiest trial fails.
    The last segment is the remaining work plus a final checkpoint.
    """
    _positive(interval_s=interval_s, checkpoint_s=checkpoint_s, mtbf_s=mtbf_s, work_s=work_s)
    _non_negative(restart_s=restart_s)
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    rng = np.random.default_rng(seed)
    seg = interval_s + checkpoint_s
    n_full = math.floor(work_s / interval_s)
    rest = work_s - n_full * interval_s
    tail = rest + checkpoint_s if rest > 1e-9 * work_s else 0.0  # the short last segment, if any

    committed = np.zeros(trials, dtype=np.int64)  # full segments written so far
    wall = np.zeros(trials)
    failures = np.zeros(trials, dtype=np.int64)
    restarting = np.zeros(trials, dtype=bool)
    active = np.ones(trials, dtype=bool)
    while active.any():
        x = rng.exponential(mtbf_s, size=trials)  # time to the next failure (memoryless, so fresh each time)
        # trials in a restart: finish it, or fail during it and start it again
        r = active & restarting
        r_ok = r & (x >= restart_s)
        r_fail = r & ~r_ok
        wall += np.where(r_ok, restart_s, 0.0) + np.where(r_fail, x, 0.0)
        failures += r_fail
        restarting[r_ok] = False
        # trials computing: finish the job before the failure, or commit the segments that fit and fail
        c = active & ~restarting & ~r_ok  # a trial that just finished its restart draws again next round
        left = (n_full - committed) * seg + tail
        done = c & (x >= left)
        fail = c & ~done
        wall += np.where(done, left, 0.0) + np.where(fail, x, 0.0)
        committed += np.where(fail, np.floor(x / seg).astype(np.int64), 0)
        failures += fail
        restarting |= fail
        active &= ~done
    goodput = work_s / wall
    lo, hi = np.percentile(goodput, [2.5, 97.5])
    return SimResult(trials, float(goodput.mean()), float(lo), float(hi), float(failures.mean()), float(wall.mean()))


@dataclass(frozen=True)
class ReliabilityPlan:
    """Checkpoint interval and goodput for a run configuration on a large cluster."""

    preset: str
    params: int
    hosts: int
    gpus: int
    mtbf_s: float
    """Mean time between failures of the whole cluster."""
    checkpoint_s: float
    checkpoint_estimated: bool
    """True when `checkpoint_s` was estimated from the state size and write bandwidth."""
    checkpoint_bytes: float
    restart_s: float
    tokens_per_step: int
    step_s: float
    """Compute time of one optimizer step at the given MFU."""
    max_steps: int
    train_compute_s: float
    """Failure-free compute time of `max_steps`."""
    young_interval_s: float
    recommended_interval_s: float
    """Daly's optimum compute time between checkpoints."""
    recommended_steps: int
    current_steps: int
    """The config's `train.checkpoint_every`."""
    goodput_recommended: float
    """Closed-form goodput checkpointing every `recommended_steps` steps."""
    goodput_current: float
    sim_recommended: SimResult
    sim_current: SimResult

    @property
    def wall_s_recommended(self) -> float:
        return self.train_compute_s / self.goodput_recommended

    def to_dict(self) -> dict[str, Any]:
        """Flat figures for JSON: the simulation results nest under `sim_recommended` / `sim_current`."""
        return {**asdict(self), "wall_s_recommended": self.wall_s_recommended}


def plan_for(
    cfg: RunConfig,
    hosts: int = OPT175B_HOSTS,
    gpus_per_host: int = OPT175B_GPUS_PER_HOST,
    host_failures_per_day: float = OPT175B_HOST_FAILURES_PER_DAY,
    checkpoint_s: float | None = None,
    restart_s: float = OPT175B_RESTART_S,
    mfu: float = OPT175B_MFU,
    peak_tflops: float = A100_PEAK_TFLOPS,
    write_gb_per_s_per_host: float = WRITE_GB_PER_S_PER_HOST,
    trials: int = 1000,
    seed: int = 0,
) -> ReliabilityPlan:
    """Plan checkpointing for `cfg` on `hosts` x `gpus_per_host` GPUs; `host_failures_per_day` is per host."""
    if hosts < 1 or gpus_per_host < 1:
        raise ValueError(f"hosts ({hosts}) and gpus_per_host ({gpus_per_host}) must be at least 1")
    _positive(host_failures_per_day=host_failures_per_day, peak_tflops=peak_tflops, write_gb_per_s_per_host=write_gb_per_s_per_host)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if checkpoint_s is not None:
        _positive(checkpoint_s=checkpoint_s)
    _non_negative(restart_s=restart_s)
    from opt.data.tokenizer import padded_vocab_size

    t = cfg.train
    model = cfg.model.build(padded_vocab_size(cfg.data.tokenizer.vocab_size), cfg.data.seq_len)
    params = count_params(model)
    mtbf = DAY_S / (hosts * host_failures_per_day)  # independent hosts: rates add
    state_bytes = float(params * CHECKPOINT_BYTES_PER_PARAM)
    delta = checkpoint_s if checkpoint_s is not None else state_bytes / (hosts * write_gb_per_s_per_host * 1e9)
    # the config's batch per optimizer step, as the trainer would resolve it for its worker count
    recipe = resolve(
        cfg.model.preset, cfg.data.seq_len, t.num_workers // t.tensor_parallel, t.micro_batch_size, t.max_steps, t.lr,
        t.warmup_steps, t.batch_tokens,
    )  # fmt: skip
    gpus = hosts * gpus_per_host
    step_s = recipe.batch_tokens * train_flops_per_token(model, cfg.data.seq_len) / (gpus * peak_tflops * 1e12 * mfu)
    tau = young_daly_interval(delta, mtbf)
    steps = max(1, round(tau / step_s))
    work = t.max_steps * step_s
    # judge both intervals as they can be configured: a whole number of steps
    rec_s, cur_s = steps * step_s, t.checkpoint_every * step_s
    return ReliabilityPlan(
        preset=cfg.model.preset,
        params=params,
        hosts=hosts,
        gpus=gpus,
        mtbf_s=mtbf,
        checkpoint_s=delta,
        checkpoint_estimated=checkpoint_s is None,
        checkpoint_bytes=state_bytes,
        restart_s=restart_s,
        tokens_per_step=recipe.batch_tokens,
        step_s=step_s,
        max_steps=t.max_steps,
        train_compute_s=work,
        young_interval_s=young_interval(delta, mtbf),
        recommended_interval_s=tau,
        recommended_steps=steps,
        current_steps=t.checkpoint_every,
        goodput_recommended=expected_goodput(rec_s, delta, restart_s, mtbf),
        goodput_current=expected_goodput(cur_s, delta, restart_s, mtbf),
        sim_recommended=simulate(rec_s, delta, restart_s, mtbf, work, trials, seed),
        sim_current=simulate(cur_s, delta, restart_s, mtbf, work, trials, seed),
    )


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * DAY_S:
        return f"{s / 3600:.1f} h"
    return f"{s / DAY_S:.1f} days"


def format_plan(plan: ReliabilityPlan) -> str:
    """Readable report used by `optctl plan`."""
    p = plan
    how = f"estimated: {p.checkpoint_bytes / 1e12:.2f} TB of state" if p.checkpoint_estimated else "given"
    lines = [
        f"OPT-{p.preset} ({p.params / 1e9:.2f}B params) on {p.hosts} hosts x {p.gpus // p.hosts} GPUs = {p.gpus} GPUs",
        f"cluster MTBF          {_duration(p.mtbf_s)} ({DAY_S / p.mtbf_s:.2f} failures/day)",
        f"checkpoint write      {_duration(p.checkpoint_s)} ({how})",
        f"restart               {_duration(p.restart_s)}",
        f"step                  {_duration(p.step_s)} ({p.tokens_per_step:,} tokens)",
        f"training compute      {_duration(p.train_compute_s)} for {p.max_steps:,} steps",
        f"Young interval        {_duration(p.young_interval_s)}",
        f"Daly interval         {_duration(p.recommended_interval_s)} -> checkpoint_every {p.recommended_steps:,} steps",
        "",
        f"{'checkpoint_every':<22}{'goodput (Daly)':>16}{'simulated (95%)':>26}{'failures':>10}{'wall time':>12}",
    ]
    for label, steps, g, sim in (
        ("recommended", p.recommended_steps, p.goodput_recommended, p.sim_recommended),
        ("current", p.current_steps, p.goodput_current, p.sim_current),
    ):
        band = f"{sim.goodput_mean:.1%} [{sim.goodput_lo:.1%}, {sim.goodput_hi:.1%}]"
        lines.append(f"{f'{steps:,} ({label})':<22}{g:>16.1%}{band:>26}{sim.failures_mean:>10.1f}{_duration(sim.wall_s_mean):>12}")
    return "\n".join(lines)
