"""OPT's learning-rate schedule: linear warmup, then linear decay to a fraction of the peak."""

from __future__ import annotations


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR for optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / decay_steps)
    return peak * (1.0 - (1.0 - min_ratio) * frac)
