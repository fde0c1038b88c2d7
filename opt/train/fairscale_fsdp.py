"""fairscale's FullyShardedDataParallel: the alternative to FSDP2, as metaseq trained OPT. CUDA only.

Layout as metaseq's: each decoder layer is its own FSDP unit, then the root (embeddings, final
LayerNorm). bf16 keeps fp32 master shards, computes in bf16 and reduce-scatters gradients in fp32
(`fp32_reduce_scatter=True`: summing bf16 gradients over ranks loses too much). `flatten_parameters=False`
keeps one parameter per original tensor, so every shard can be named in a checkpoint.

fairscale shards a parameter by flattening it and taking rank r's `torch.chunk` (zero-padded to the
first chunk's length). Checkpoints go through `torch.distributed.checkpoint` as FSDP2's do, each
parameter and its optimizer state saved as a 1-D DTensor sharded the same way (padding dropped): the
commit protocol, retention, corrupted-checkpoint fallback and N-to-M resharding are shared with FSDP2.
The stored tensors are flat, so a run cannot switch between the two backends on resume (the trainer
refuses with a message), and `export` reshapes them to the model's shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opt.config import FAIRSCALE_NEEDS_CUDA
from opt.model import OPT


def wrap(model: OPT, precision: str, device: torch.device | None = None) -> nn.Module:
    """Shard `model` (on its compute device, the same initial weights on every rank) with fairscale's FSDP."""
    from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP

    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError(FAIRSCALE_NEEDS_CUDA)
        device = torch.device("cuda", torch.cuda.current_device())
    bf16 = precision == "bf16"
    kwargs: dict[str, Any] = dict(
        flatten_parameters=False,
        reshard_after_forward=True,
        mixed_precision=bf16,
        compute_dtype=torch.bfloat16 if bf16 else torch.float32,
        fp32_reduce_scatter=bf16,
        compute_device=device,
        state_dict_device=torch.device("cpu"),
    )
    for i, layer in enumerate(model.layers):
        model.layers[i] = FSDP(layer, **kwargs)
    return FSDP(model, **kwargs)


def _clean(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in ("_fsdp_wrapped_module", "_fpw_module"))


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter behind a (possibly sharded, flattened) fairscale parameter."""
    return torch.Size(getattr(p, "_orig_size", p.shape))


def _span(numel: int, world: int, rank: int) -> tuple[int, int]:
    """Start and length of rank `rank`'s piece of a flat tensor of `numel` elements (torch.chunk's split)."""
    size = -(-numel // world)
    start = min(numel, rank * size)
    return start, min(size, numel - start)


class _Flat:
    """Wraps local shards as 1-D DTensors (Shard(0), torch.chunk's split) on a mesh over the ranks."""

    def __init__(self, device_type: str) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.mesh = init_device_mesh(device_type, (self.world,)) if self.world > 1 else None

    def __call__(self, local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        numel = full_shape(p).numel()
        if not getattr(p, "_is_sharded", False) or self.mesh is None:
            return local.view(-1)  # the whole tensor on every rank (one rank, or a tensor fairscale left whole)
        from torch.distributed.tensor import DTensor, Shard

        _, length = _span(numel, self.world, self.rank)
        return DTensor.from_local(local.view(-1)[:length], self.mesh, [Shard(0)], run_check=False, shape=torch.Size([numel]), stride=(1,))


def _named(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(_clean(n), p) for n, p in model.named_parameters()]


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as flat tensors sharded over the ranks (views: loading into them loads the model)."""
    flat = _Flat(next(model.parameters()).device.type)
    return {name: flat(p.data, p) for name, p in _named(model)}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (as DCP's `get_optimizer_state_dict` keys it), flat and sharded.

    Creates the state first if the optimizer has not stepped yet, so the result can also be a load target.
    """
    _ensure_state(optimizer)
    flat = _Flat(next(model.parameters()).device.type)
    names = {id(p): name for name, p in _named(model)}
    state: dict[str, dict[str, Any]] = {}
    for p, s in optimizer.state.items():
        assert isinstance(p, torch.Tensor)
        state[names[id(p)]] = {k: flat(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups
    ]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, loaded: dict[str, Any]) -> None:
    """After `dcp.load` into `optimizer_state(...)`: the tensors are loaded in place; copy the groups' settings."""
    if len(loaded["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(loaded['param_groups'])} parameter groups, the optimizer {len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, loaded["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _ensure_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state (a step with zero gradients and lr 0: nothing moves)."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params]
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if not torch.is_tensor(g["lr"]) else torch.zeros_like(g["lr"])
    optimizer.step()
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
