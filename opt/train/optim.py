"""Optimizers of OPT's recipe, and what changes when a run resumes with other settings.

OPT-175B's engineers switched AdamW to SGD and back, lowered the LR and the clipping by hand. Here each
is a configuration change on resume: `hparams(cfg)` is recorded in every checkpoint, `changes` says
what differs on resume, and `apply_hparams` puts the new values into the restored optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from opt.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and LayerNorm parameters are not decayed."""
    from opt.train.fairscale_fsdp import full_shape  # a fairscale shard is flat: judge it by the whole tensor

    decay = [p for p in model.parameters() if len(full_shape(p)) >= 2]
    no_decay = [p for p in model.parameters() if len(full_shape(p)) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name: str, model: torch.nn.Module, t: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (OPT: betas 0.9/0.95, decoupled weight decay 0.1) or SGD with momentum."""
    groups = param_groups(model, t.weight_decay)
    if name == "adamw":
        # fused: one kernel per step over all tensors (CPU and GPU); torch's default on CPU is a per-tensor
        # loop with temporaries, ~7x slower at 125m. The update is the same up to float rounding.
        return torch.optim.AdamW(groups, lr=lr, betas=t.betas, eps=t.eps, fused=True)
    if name == "sgd":
        # SGD's weight decay is coupled (added to the gradient); at the same lr it shrinks weights by
        # lr * wd per step, as AdamW's decoupled decay does
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or sgd")


def hparams(t: TrainConfig, peak_lr: float) -> dict[str, Any]:
    """The optimizer settings a checkpoint records, so a resume can tell what changed."""
    return {
        "optimizer": t.optimizer,
        "lr": peak_lr,
        "grad_clip": t.grad_clip,
        "betas": list(t.betas),
        "eps": t.eps,
        "weight_decay": t.weight_decay,
        "momentum": t.momentum,
    }


def changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """`{setting: [old, new]}` for every recorded setting that differs (settings missing in `old` are new)."""
    # settings irrelevant to the optimizer in use are not changes (SGD has no betas, AdamW no momentum)
    ignore = {"adamw": {"momentum"}, "sgd": {"betas", "eps"}}
    skip = ignore.get(old.get("optimizer", ""), set()) & ignore.get(new.get("optimizer", ""), set())
    return {k: [old.get(k), v] for k, v in new.items() if k not in skip and k in old and old[k] != v}


def apply_hparams(optimizer: torch.optim.Optimizer, t: TrainConfig) -> None:
    """Put the configured settings into an optimizer whose state (and old settings) came from a checkpoint."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = tuple(t.betas)
            group["eps"] = t.eps
        if "momentum" in group:
            group["momentum"] = t.momentum
    optimizer.param_groups[0]["weight_decay"] = t.weight_decay  # the matrices' group (see param_groups)
