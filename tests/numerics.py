"""Comparing float32 results computed two ways, with tolerances from fp32 roundoff instead of one machine's figures.

Two computations of one float32 quantity that sum in different orders (another CPU's matmul blocking, a reduction
split over ranks, a fused kernel) differ by roundoff: for a sum of n terms by at most about n * u * sum(|terms|),
u = 2^-24. An element that is the small difference of large terms (a near-zero gradient) carries the roundoff of
those terms, not of its own size, so every bound here is relative to a tensor's scale (its largest magnitude), never
to an element's: that is what made elementwise `rtol`/`atol` pairs pass on one CPU and fail on the next. A real bug
(a missing all-reduce, a wrong shard, a dropped term) is off by a sizeable fraction of the scale, 10^3 and more
times these bounds; `tests/unit/train/test_tensor_parallel.py` shows it on deliberately broken layouts.

Each check returns the share of its tolerance that every tensor used (above 1: off), so a test can assert and a
person can see the headroom: `NUMERICS_REPORT=1 pytest -s ...` prints each comparison's worst share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

import torch

U = 2.0**-24  # fp32 unit roundoff
REL = 2.0**-16  # 256 u: the roundoff of fp32 reductions a few hundred terms long, each term already rounded
DRIFT = 1e-2  # multi-step runs: each tensor's update as a whole within 1% (`update_usage`)

Tensors = Mapping[str, torch.Tensor]


def _block(name: str) -> str:
    """The block a tensor belongs to: its module's parent (layers.0.self_attn.k_proj.bias -> layers.0.self_attn)."""
    parts = name.split(".")
    return ".".join(parts[:-2])


def _by_block(own: Mapping[str, float]) -> dict[str, float]:
    """The tensors of one block (an attention block's four projections; a decoder layer's FFN and LayerNorms) are
    sums over the same tokens of terms of related size, and a tensor's roundoff is that of its terms, not of its
    own size: so each is measured at the largest scale in its block. This keeps an analytically zero gradient
    (k_proj.bias's: softmax is shift-invariant) at its block's roundoff rather than at its own."""
    top: dict[str, float] = {}
    for k, s in own.items():
        top[_block(k)] = max(top.get(_block(k), 0.0), s)
    return {k: top[_block(k)] for k in own}


def _max_abs(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def scales(want: Tensors) -> dict[str, float]:
    """name -> the scale a tensor's roundoff is measured against: the largest max |value| in its block."""
    return _by_block({k: _max_abs(t) for k, t in want.items()})


def analytically_zero(names: Iterable[str]) -> set[str]:
    """The parameters of OPT whose gradient is zero in exact arithmetic: the key projection's bias. Adding one
    vector to every key adds, for each query, one constant to all its attention logits, which softmax ignores.
    What a run computes for them is roundoff, and Adam turns it into steps of up to lr in random directions."""
    return {k for k in names if k.endswith("self_attn.k_proj.bias")}


def at_roundoff(values: Tensors) -> set[str]:
    """The tensors that cannot be told from zero: every value within roundoff (REL) of the block's scale."""
    s = scales(values)
    return {k for k, t in values.items() if _max_abs(t) <= REL * s[k]}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} against {tuple(b.shape)}")
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def _share(diff: float, tol: float) -> float:
    return diff / tol if tol > 0 else (0.0 if diff == 0 else math.inf)


def _same_names(have: Tensors, want: Tensors) -> None:
    if have.keys() != want.keys():
        raise AssertionError(f"tensor names differ: {sorted(set(have) ^ set(want))}")


def roundoff_usage(have: Tensors, want: Tensors, rel: float = REL) -> dict[str, float]:
    """One computation two ways (no drift between them): max|have - want| against rel x each tensor's scale."""
    _same_names(have, want)
    s = scales(want)
    return {k: _share(_max_diff(have[k], want[k]), rel * s[k]) for k in want}


def update_usage(have: Tensors, want: Tensors, start: Tensors, rel: float = DRIFT, skip: set[str] | None = None) -> dict[str, float]:
    """Parameters after several updates from the same `start`, compared by their updates (want - start) as a whole.

    Per tensor, the L2 norm of have - want against `rel` x the L2 norm the update would have at the largest RMS in
    its block. Not elementwise: after the first step the two runs' parameters differ by roundoff,
    so a ReLU input that was within roundoff of zero may fall on the other side of the kink in one run (one unit
    for one token), and Adam turns an element's roundoff-level gradient into a step of up to lr (see
    `adam_reach_usage`). Either shifts a tensor's update by a small share of a percent; a layout bug by tens of
    percent. `skip`: tensors left out (under Adam, an analytically zero gradient's update is all noise).
    """
    _same_names(have, want)
    moved = {k: want[k].double() - start[k].double() for k in want}
    rms = _by_block({k: m.norm().item() / math.sqrt(max(m.numel(), 1)) for k, m in moved.items()})
    usage = {}
    for k in want:
        if skip and k in skip:
            continue
        diff = (have[k].double() - want[k].double()).norm().item()
        usage[k] = _share(diff, rel * math.sqrt(want[k].numel()) * rms[k])
    return usage


def adam_reach_usage(have: Tensors, want: Tensors, lr: float, steps: int) -> dict[str, float]:
    """Adam(W) runs compared within Adam's own reach: max|have - want| against 2 x lr a step.

    Adam divides each element's step by that element's own gradient history (lr * m / sqrt(v)), so an element
    whose gradient is at roundoff level takes a step of up to about lr in a direction roundoff chose: two correct
    runs may differ there by up to 2 lr a step (weight decay's share, lr x 0.1 x |p| a step, is far below that).
    """
    _same_names(have, want)
    return {k: _share(_max_diff(have[k], want[k]), 2 * lr * steps) for k in want}


def off(usage: Mapping[str, float]) -> dict[str, float]:
    """The entries of a usage map over their tolerance."""
    return {k: v for k, v in usage.items() if not v <= 1.0}


def assert_within(usage: Mapping[str, float], what: str) -> None:
    """Fail naming every entry over its tolerance; with NUMERICS_REPORT=1 (and pytest -s), print the headroom."""
    if os.environ.get("NUMERICS_REPORT") and usage:
        name, share = worst(usage)
        print(f"\nnumerics: {what}: worst {name} used {share:.3g} of its tolerance")
    bad = off(usage)
    assert not bad, f"{what}: over the fp32 roundoff tolerance (share used): {bad}"


def worst(usage: Mapping[str, float]) -> tuple[str, float]:
    """The entry that used the largest share of its tolerance, and that share (for messages and notes)."""
    key = max(usage, key=lambda k: usage[k])
    return key, usage[key]
