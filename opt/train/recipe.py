"""OPT's training recipe per preset (paper table 1 and section 2.2), resolved against a run's shape."""

from __future__ import annotations

import math
from dataclasses import dataclass

from opt.errors import OptError

# preset -> (peak LR, batch size in tokens)
OPT_RECIPES: dict[str, tuple[float, int]] = {
    "125m": (6.0e-4, 500_000),
    "350m": (3.0e-4, 500_000),
    "1.3b": (2.0e-4, 1_000_000),
    "2.7b": (1.6e-4, 1_000_000),
    "6.7b": (1.2e-4, 2_000_000),
    "13b": (1.0e-4, 4_000_000),
    "30b": (1.0e-4, 4_000_000),
    "66b": (0.8e-4, 2_000_000),
    "175b": (1.2e-4, 2_000_000),
}
DEBUG_LR = 1e-3  # the tiny debug preset is not in the paper; a small model tolerates a larger step
WARMUP_TOKENS = 375_000_000  # smaller models warm up over 375M tokens...
WARMUP_STEPS_175B = 2000  # ...175B over 2000 steps


class RecipeError(OptError):
    """A batch size the run's shape cannot reach; the message says which numbers to change."""


@dataclass(frozen=True)
class ResolvedRecipe:
    lr: float
    warmup_steps: int
    grad_accum: int
    """Micro-batches per optimizer step on each rank."""
    batch_tokens: int
    """Tokens per optimizer step across all ranks."""


def resolve(
    preset: str,
    seq_len: int,
    world: int,
    micro_batch: int,
    max_steps: int,
    lr: float | None = None,
    warmup_steps: int | None = None,
    batch_tokens: int | None = None,
) -> ResolvedRecipe:
    """The run's LR, warmup and gradient accumulation: explicit values win, else OPT's for the preset.

    `batch_tokens=None` means one micro-batch per rank per step. Otherwise it is reached by gradient
    accumulation and must be a whole number of micro-batches across the ranks.
    """
    paper = OPT_RECIPES.get(preset)
    per_micro = micro_batch * seq_len * world
    if batch_tokens is None:
        accum = 1
    else:
        accum, rest = divmod(batch_tokens, per_micro)
        if accum < 1 or rest:
            raise RecipeError(
                f"train.batch_tokens={batch_tokens} is not a multiple of micro_batch_size x seq_len x workers = "
                f"{micro_batch} x {seq_len} x {world} = {per_micro}; use e.g. {max(1, round(batch_tokens / per_micro)) * per_micro}"
            )
    tokens = per_micro * accum
    if warmup_steps is None:
        if paper is None:
            warmup_steps = max(1, max_steps // 10)
        elif preset == "175b":
            warmup_steps = WARMUP_STEPS_175B
        else:
            warmup_steps = math.ceil(WARMUP_TOKENS / tokens)
    peak = lr if lr is not None else (paper[0] if paper else DEBUG_LR)
    return ResolvedRecipe(peak, warmup_steps, accum, tokens)
