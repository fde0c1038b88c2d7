"""opt.model.plan: parameter counts and per-GPU memory for sizes we can plan for but not run here."""

from __future__ import annotations

import pytest

from opt.model import OPT, OPTConfig
from opt.model.plan import BYTES_PER_PARAM, GiB, MemoryPlan, count_params, memory_per_gpu, train_flops_per_token

SMALL_CONFIGS = {
    "debug": OPTConfig.preset("debug"),
    "350m-style": OPTConfig.preset("debug", pre_ln=False, word_embed_dim=32),
    "custom-ffn": OPTConfig(n_layer=3, n_head=2, d_model=24, d_ffn=40, vocab_size=100, max_seq_len=16),
    "wide-embed": OPTConfig(n_layer=1, n_head=1, d_model=8, word_embed_dim=12, vocab_size=50, max_seq_len=4),
}


@pytest.mark.parametrize("cfg", SMALL_CONFIGS.values(), ids=SMALL_CONFIGS.keys())
def test_count_params_matches_an_instantiated_model(cfg: OPTConfig) -> None:
    model = OPT(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters()) == model.num_params()


# Sizes of the released checkpoints (tied embeddings counted once).
@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [
        ("125m", 125.2e6 * 0.99, 125.2e6 * 1.01),
        ("350m", 331e6 * 0.99, 331e6 * 1.01),
        ("1.3b", 1.316e9 * 0.99, 1.316e9 * 1.01),
        ("175b", 174.6e9, 175.3e9),
    ],
)
def test_count_params_of_the_real_presets(preset: str, low: float, high: float) -> None:
    assert low <= count_params(OPTConfig.preset(preset)) <= high


def test_flops_per_token_is_6n_plus_attention() -> None:
    cfg = OPTConfig.preset("125m")
    assert train_flops_per_token(cfg, 2048) == 6 * count_params(cfg) + 12 * 12 * 768 * 2048
    assert train_flops_per_token(cfg) == train_flops_per_token(cfg, cfg.max_seq_len)


def _model_states_gib(plan: MemoryPlan) -> float:
    return plan.weights_gib + plan.grads_gib + plan.optimizer_gib


def test_full_sharding_divides_model_states_by_the_data_parallel_degree() -> None:
    cfg = OPTConfig.preset("1.3b")
    single = memory_per_gpu(cfg, gpus=1)
    eight = memory_per_gpu(cfg, gpus=8)
    assert single.weights_gib == pytest.approx(count_params(cfg) * BYTES_PER_PARAM["weights"] / GiB)
    assert _model_states_gib(single) == pytest.approx(count_params(cfg) * 16 / GiB)
    assert eight.data_parallel == 8
    for part in ("weights_gib", "grads_gib", "optimizer_gib"):
        assert getattr(eight, part) == pytest.approx(getattr(single, part) / 8)
    assert eight.activations_gib == pytest.approx(single.activations_gib)  # activations are per rank


def test_other_sharding_strategies_replicate_what_they_do_not_shard() -> None:
    cfg = OPTConfig.preset("1.3b")
    single = memory_per_gpu(cfg, gpus=1)
    zero2 = memory_per_gpu(cfg, gpus=8, sharding="grad_op")
    ddp = memory_per_gpu(cfg, gpus=8, sharding="none")
    assert zero2.weights_gib == pytest.approx(single.weights_gib)
    assert zero2.grads_gib == pytest.approx(single.grads_gib / 8)
    assert zero2.optimizer_gib == pytest.approx(single.optimizer_gib / 8)
    assert _model_states_gib(ddp) == pytest.approx(_model_states_gib(single))


def test_tensor_parallel_divides_model_states_further() -> None:
    cfg = OPTConfig.preset("13b")
    dp_only = memory_per_gpu(cfg, gpus=8, tensor_parallel=1)
    tp8 = memory_per_gpu(cfg, gpus=64, tensor_parallel=8)
    assert (tp8.tensor_parallel, tp8.data_parallel) == (8, 8)
    assert _model_states_gib(tp8) == pytest.approx(_model_states_gib(dp_only) / 8)
    assert tp8.activations_gib < dp_only.activations_gib


def test_activation_checkpointing_saves_activation_memory() -> None:
    cfg = OPTConfig.preset("1.3b")
    on = memory_per_gpu(cfg, gpus=8, activation_checkpointing=True)
    off = memory_per_gpu(cfg, gpus=8, activation_checkpointing=False)
    assert on.activations_gib < off.activations_gib
    assert memory_per_gpu(cfg, gpus=8, micro_batch=2).activations_gib == pytest.approx(2 * on.activations_gib)


@pytest.mark.parametrize("tp", [1, 8])
def test_activations_follow_korthikanti_et_al(tp: int) -> None:
    # Reducing Activation Recomputation in Large Transformer Models (2022), TP without sequence
    # parallelism: s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes per layer; the 10*s*b*h of LayerNorm inputs
    # and dropout masks is replicated on every TP rank, the rest is split.
    cfg = OPTConfig.preset("13b")
    s, b, h, a, L = 2048, 2, cfg.d_model, cfg.n_head, cfg.n_layer
    per_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    plan = memory_per_gpu(cfg, gpus=8 * tp, tensor_parallel=tp, micro_batch=b, seq_len=s, activation_checkpointing=False)
    assert plan.activations_gib == pytest.approx(L * per_layer / GiB)
    # With checkpointing: every layer's bf16 input (2*s*b*h, not split by TP) plus one layer recomputed.
    plan = memory_per_gpu(cfg, gpus=8 * tp, tensor_parallel=tp, micro_batch=b, seq_len=s)
    assert plan.activations_gib == pytest.approx((L * 2 * s * b * h + per_layer) / GiB)


@pytest.mark.parametrize(
    ("gpus", "tp", "sharding", "match"),
    [
        (0, 1, "full", "positive multiple"),
        (-8, 1, "full", "positive multiple"),
        (8, 0, "full", "positive multiple"),
        (12, 8, "full", "positive multiple"),  # 12 GPUs cannot be split into TP groups of 8
        (16, 5, "full", "positive multiple"),
        (10, 5, "full", "divide the head count"),  # 32 heads
        (8, 1, "zero3", "sharding must be one of"),
    ],
)
def test_invalid_layouts_raise_value_error(gpus: int, tp: int, sharding: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        memory_per_gpu(OPTConfig.preset("1.3b"), gpus=gpus, tensor_parallel=tp, sharding=sharding)


def test_175b_on_992_gpus_with_tp_8_fits_in_80gb() -> None:
    # The OPT-175B run: 992 80GB A100s, Megatron TP 8 x FSDP over the remaining 124 ranks.
    plan = memory_per_gpu(OPTConfig.preset("175b"), gpus=992, tensor_parallel=8)
    assert (plan.data_parallel, plan.sharding) == (124, "full")
    assert plan.total_gib * GiB < 80e9
    # ... and it would not fit without sharding the model states.
    assert memory_per_gpu(OPTConfig.preset("175b"), gpus=992, tensor_parallel=8, sharding="none").total_gib * GiB > 80e9
