"""Megatron-style tensor parallelism (fairscale's model-parallel layers) composed with FSDP2 data parallelism.

Ranks form a 2D (dp, tp) grid, rank = dp_rank * tp + tp_rank, so the tp ranks of a group are adjacent (same host
on a GPU cluster). Attention heads, the feed-forward inner dimension and the vocabulary are split over tp; FSDP2
then shards every rank's (already tp-local) parameters over its dp group. Order: `init_layout`, build the full
model with the same seed on every rank, `tensor_parallel`, `shard_data_parallel`, then the optimizer.

Under TP, `model(idx)` returns this rank's vocab slice of the logits, (B, T, vocab / tp), and `model.loss`
reduces over the slices; use fairscale's `gather_from_model_parallel_region` for full logits.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn import model_parallel as mpu
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from opt.model.config import OPTConfig
from opt.model.model import OPT, DecoderLayer, SelfAttention

# Modules whose parameters are split over tp, and the dim each parameter is split on. RowParallelLinear's bias is
# added after the all-reduce, so it is replicated and absent here.
_SPLIT_DIMS: dict[type[nn.Module], dict[str, int]] = {
    ColumnParallelLinear: {"weight": 0, "bias": 0},
    RowParallelLinear: {"weight": 1},
    VocabParallelEmbedding: {"weight": 0},
}

_M = TypeVar("_M", bound=nn.Module)

# The same, by OPT's parameter names, for code that has a checkpoint but no TP model (export)
_SPLIT_BY_NAME = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "fc1": 0, "out_proj": 1, "fc2": 1, "embed_tokens": 0}


def split_dim(key: str) -> int | None:
    """The dim along which tensor parallelism splits state-dict entry `key` (None: replicated on every tp rank)."""
    *_, module, name = key.split(".")
    dim = _SPLIT_BY_NAME.get(module)
    if dim is None or (name == "bias" and dim == 1):  # a row-parallel bias is added after the all-reduce
        return None
    return dim


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the dp x tp grid (world = dp * tp, rank = dp_rank * tp + tp_rank)."""

    dp: int
    tp: int
    dp_rank: int
    tp_rank: int
    mesh: DeviceMesh
    """2D mesh with mesh_dim_names ("dp", "tp")."""

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("tp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")


def init_layout(tp: int, device_type: str) -> ParallelLayout:
    """Build the dp x tp mesh and fairscale's model-parallel groups (same ranks); call after `init_process_group`."""
    if not dist.is_initialized():
        raise RuntimeError("init_layout needs torch.distributed.init_process_group first")
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"tensor-parallel size {tp} must be >= 1 and divide the world size {world}")
    dp = world // tp
    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    if not mpu.initialize.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes on rank 0
            mpu.initialize_model_parallel(tp)
    # fairscale's layers find their group through its own globals, not through our mesh: they must agree.
    for name, theirs in (("tp", mpu.get_model_parallel_group()), ("dp", mpu.get_data_parallel_group())):
        ours = dist.get_process_group_ranks(mesh.get_group(name))
        if dist.get_process_group_ranks(theirs) != ours:
            raise RuntimeError(f"fairscale's {name} group {dist.get_process_group_ranks(theirs)} differs from the mesh's {ours}")
    return ParallelLayout(dp=dp, tp=tp, dp_rank=mesh.get_local_rank("dp"), tp_rank=mesh.get_local_rank("tp"), mesh=mesh)


def check_tensor_parallel(cfg: OPTConfig, tp: int) -> None:
    """Raise ValueError unless `cfg` splits evenly over `tp` ranks."""
    for name, size in (("n_head", cfg.n_head), ("ffn_dim", cfg.ffn_dim), ("vocab_size", cfg.vocab_size)):
        if size % tp:
            raise ValueError(f"tensor parallelism needs {name} ({size}) divisible by tp ({tp})")


class _TensorParallelOPT(OPT):
    """OPT whose tied output projection and loss run over the vocab shards (set on an instance by `tensor_parallel`)."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's vocab slice of the logits, (B, T, vocab / tp); with `targets`, the loss of `loss`."""
        # Each rank sees only its vocab rows, so the gradient w.r.t. the hidden states is summed over tp in backward.
        logits = F.linear(mpu.copy_to_model_parallel_region(self.hidden(idx)), self.embed_tokens.weight)
        return logits if targets is None else _vocab_parallel_loss(logits, targets)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the vocab shards; targets equal to -100 are ignored (0 if all are)."""
        return _vocab_parallel_loss(self(idx), targets)


def _vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # .float() is a no-op for fp32 logits: fine, since fairscale subtracts the max from them in place and
    # nothing else holds them. It has no ignore_index: give ignored positions a valid id, then zero them.
    keep = targets != -100
    per_token = mpu.vocab_parallel_cross_entropy(logits.float(), targets.masked_fill(~keep, 0))
    return (per_token * keep).sum() / keep.sum().clamp(min=1)


def _no_init(weight: torch.Tensor) -> torch.Tensor:
    # fairscale initialises a full-size master weight and scatters it; we overwrite the shard from the existing
    # model anyway, and a real init would draw from (and shift) the global RNG.
    return weight


def _column(old: nn.Linear, layout: ParallelLayout) -> ColumnParallelLinear:
    new = ColumnParallelLinear(old.in_features, old.out_features, bias=old.bias is not None, gather_output=False, init_method=_no_init)
    return _copy_shards(new, old, layout)


def _row(old: nn.Linear, layout: ParallelLayout) -> RowParallelLinear:
    new = RowParallelLinear(old.in_features, old.out_features, bias=old.bias is not None, input_is_parallel=True, init_method=_no_init)
    return _copy_shards(new, old, layout)


def _copy_shards(new: _M, old: nn.Linear | nn.Embedding, layout: ParallelLayout) -> _M:
    """Give `new` this rank's slices of `old`'s parameters (same device, dtype and requires_grad)."""
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    split = _SPLIT_DIMS[type(new)]
    with torch.no_grad():
        for name, param in new.named_parameters(recurse=False):
            full = getattr(old, name)
            param.copy_(full.chunk(layout.tp, dim=split[name])[layout.tp_rank] if name in split else full)
            param.requires_grad_(full.requires_grad)
    return new


def tensor_parallel(model: OPT, layout: ParallelLayout) -> OPT:
    """Split `model` over the tp group in place, keeping OPT's parameter names; weights are slices of the current ones."""
    check_tensor_parallel(model.cfg, layout.tp)
    if type(model) is not OPT:
        raise ValueError(f"tensor_parallel expects a plain OPT (before FSDP, applied once), got {type(model).__name__}")
    if not mpu.initialize.model_parallel_is_initialized() or mpu.get_model_parallel_world_size() != layout.tp:
        raise RuntimeError("fairscale's model-parallel groups do not match the layout; call init_layout first")
    for module in list(model.modules()):
        if isinstance(module, SelfAttention):
            module.q_proj, module.k_proj, module.v_proj = (_column(p, layout) for p in (module.q_proj, module.k_proj, module.v_proj))
            module.out_proj = _row(module.out_proj, layout)
            module.n_head //= layout.tp
        elif isinstance(module, DecoderLayer):
            module.fc1 = _column(module.fc1, layout)
            module.fc2 = _row(module.fc2, layout)
    old = model.embed_tokens
    embed = VocabParallelEmbedding(old.num_embeddings, old.embedding_dim, init_method=_no_init)
    # fairscale hands padding_idx to F.embedding as is, but its lookup uses shard-local ids: only the rank that
    # owns the pad row may keep it, shifted to its local index.
    if old.padding_idx is not None and embed.vocab_start_index <= old.padding_idx < embed.vocab_end_index:
        embed.padding_idx = old.padding_idx - embed.vocab_start_index
    model.embed_tokens = _copy_shards(embed, old, layout)
    model.__class__ = _TensorParallelOPT
    return model


def shard_data_parallel(model: OPT, layout: ParallelLayout, mp_policy: MixedPrecisionPolicy | None = None) -> OPT:
    """FSDP2 over the dp sub-mesh: each decoder layer, then the root (embeddings, final LayerNorm)."""
    from torch.distributed.fsdp import fully_shard

    mp = mp_policy or MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mesh=layout.dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=layout.dp_mesh, mp_policy=mp)
    return model


def _split_params(model: nn.Module) -> dict[str, int]:
    """State-dict key -> tp split dim, for every parameter split over tp."""
    return {
        f"{prefix}.{name}" if prefix else name: dim
        for prefix, module in model.named_modules()
        for name, dim in _SPLIT_DIMS.get(type(module), {}).items()
        if getattr(module, name, None) is not None
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, layout: ParallelLayout) -> torch.Tensor:
    """Clip gradients in place to a global L2 norm of `max_norm` and return that norm (the same on every rank).

    Each rank sums squares over its local (FSDP and tp) shards; parameters replicated over tp are counted on
    tp_rank 0 only, so one all-reduce over the world gives the norm of the full, unsharded gradient.
    """
    split = _split_params(model)
    sharded: list[torch.Tensor] = []
    replicated: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (sharded if name in split else replicated).append(_local(p.grad))
    counted = sharded + (replicated if layout.tp_rank == 0 else [])
    device = next(model.parameters()).device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in counted:
        sq += torch.linalg.vector_norm(g, dtype=torch.float32).square()
    dist.all_reduce(sq)
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g in sharded + replicated:
        g.mul_(coef.to(g.dtype))
    return total


def full_state_dict(model: nn.Module, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """The full OPT state dict (original keys and shapes, on CPU) on every rank, gathered over dp and tp."""
    return _gather_full(model.state_dict().items(), model, layout)


def full_grads(model: nn.Module, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient (OPT's names and shapes, on CPU) on every rank, gathered over dp and tp."""
    return _gather_full(((n, p.grad) for n, p in model.named_parameters() if p.grad is not None), model, layout)


def _gather_full(tensors: Iterable[tuple[str, torch.Tensor]], model: nn.Module, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    split = _split_params(model)
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors:
        t = value.full_tensor() if isinstance(value, DTensor) else value
        if name in split and layout.tp > 1:
            parts = [torch.empty_like(t) for _ in range(layout.tp)]
            dist.all_gather(parts, t.contiguous(), group=layout.tp_group)
            t = torch.cat(parts, dim=split[name])
        out[name] = t.detach().cpu().clone()
    return out
