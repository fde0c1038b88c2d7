"""Size, compute and memory planning for OPT presets on hardware we cannot run here."""

from __future__ import annotations

from dataclasses import dataclass

from opt.model.config import POSITION_OFFSET, OPTConfig

GiB = 2**30
# Mixed-precision AdamW: bf16 weights (2) + bf16 grads (2) + fp32 master weights, m and v (12).
BYTES_PER_PARAM = {"weights": 2, "grads": 2, "optimizer": 12}
SHARDING = ("full", "grad_op", "none")  # FSDP FULL_SHARD (ZeRO-3), SHARD_GRAD_OP (ZeRO-2), plain DDP


def count_params(cfg: OPTConfig) -> int:
    """Parameters of the model, counting the tied output embedding once."""
    C, F, E = cfg.d_model, cfg.ffn_dim, cfg.embed_dim
    per_layer = 4 * (C * C + C) + (C * F + F) + (F * C + C) + 2 * 2 * C  # attn, fc1, fc2, 2 LayerNorms
    n = cfg.vocab_size * E + (cfg.max_seq_len + POSITION_OFFSET) * C + cfg.n_layer * per_layer
    if E != C:
        n += 2 * E * C  # project_in / project_out
    if cfg.pre_ln:
        n += 2 * C  # final LayerNorm
    return n


def train_flops_per_token(cfg: OPTConfig, seq_len: int | None = None) -> float:
    """Forward+backward FLOPs per token: 6N for the weights plus 12*L*C*T for attention scores."""
    T = seq_len or cfg.max_seq_len
    return 6 * count_params(cfg) + 12 * cfg.n_layer * cfg.d_model * T


@dataclass(frozen=True)
class MemoryPlan:
    params: int
    gpus: int
    tensor_parallel: int
    data_parallel: int
    sharding: str
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib


def memory_per_gpu(
    cfg: OPTConfig,
    gpus: int,
    tensor_parallel: int = 1,
    sharding: str = "full",
    micro_batch: int = 1,
    seq_len: int | None = None,
    activation_checkpointing: bool = True,
) -> MemoryPlan:
    """Per-GPU memory of mixed-precision AdamW training under TP x FSDP.

    Activations follow Korthikanti et al. 2022 (bf16, no sequence parallelism): per layer
    T*b*C*(10 + 24/TP + 5*H*T/(C*TP)) bytes, or only the layer input (2*T*b*C) when checkpointing,
    plus one layer's full activations for the recompute.
    """
    if gpus <= 0 or tensor_parallel <= 0 or gpus % tensor_parallel:
        raise ValueError(f"gpus ({gpus}) must be a positive multiple of tensor_parallel ({tensor_parallel})")
    if cfg.n_head % tensor_parallel:
        raise ValueError(f"tensor_parallel ({tensor_parallel}) must divide the head count ({cfg.n_head})")
    if sharding not in SHARDING:
        raise ValueError(f"sharding must be one of {SHARDING}, got {sharding!r}")
    dp = gpus // tensor_parallel
    n = count_params(cfg)
    per_rank = n / tensor_parallel
    shard = {"full": (dp, dp, dp), "grad_op": (1, dp, dp), "none": (1, 1, 1)}[sharding]
    w, g, o = (per_rank * BYTES_PER_PARAM[k] / s for k, s in zip(("weights", "grads", "optimizer"), shard, strict=False))
    T, C, b = seq_len or cfg.max_seq_len, cfg.d_model, micro_batch
    # 10*T*b*C (LayerNorm inputs, dropout masks) is replicated on every TP rank; the rest is split.
    full_layer = T * b * C * (10 + 24 / tensor_parallel + 5 * cfg.n_head * T / (C * tensor_parallel))
    act = (cfg.n_layer * 2 * T * b * C + full_layer) if activation_checkpointing else cfg.n_layer * full_layer
    return MemoryPlan(n, gpus, tensor_parallel, dp, sharding, w / GiB, g / GiB, o / GiB, act / GiB)


def _count(n: float) -> str:
    """1.3B, 125.2M, 239.5K: three significant figures in the unit that fits."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"


def describe(name: str, cfg: OPTConfig, plan: MemoryPlan, seq_len: int | None = None) -> str:
    """Human-readable summary used by `optctl model info`."""
    flops = train_flops_per_token(cfg, seq_len)
    lines = [
        f"OPT-{name}: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, ffn {cfg.ffn_dim}, "
        f"vocab {cfg.vocab_size}, {'pre' if cfg.pre_ln else 'post'}-LN",
        f"parameters        {plan.params:,} ({_count(plan.params)})",
        f"train FLOPs/token {flops:.3e} (6N + 12*L*C*T at T={seq_len or cfg.max_seq_len})",
        f"layout            {plan.gpus} GPUs = TP {plan.tensor_parallel} x DP {plan.data_parallel}, sharding {plan.sharding}",
        "memory per GPU (GiB):",
        f"  weights (bf16)    {plan.weights_gib:10.2f}",
        f"  grads (bf16)      {plan.grads_gib:10.2f}",
        f"  optimizer (fp32)  {plan.optimizer_gib:10.2f}",
        f"  activations       {plan.activations_gib:10.2f}",
        f"  total             {plan.total_gib:10.2f}",
    ]
    return "\n".join(lines)
