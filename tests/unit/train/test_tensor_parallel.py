"""Tensor parallelism (fairscale layers) x FSDP2 on real gloo ranks: training must match one process exactly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opt.model import OPT, OPTConfig
from opt.train.tensor_parallel import (
    ParallelLayout,
    check_tensor_parallel,
    clip_grad_norm_,
    full_state_dict,
    init_layout,
    shard_data_parallel,
    tensor_parallel,
)
from tests.distributed import run_ranks

# init_std 0.02 and lr 1e-2 so that five steps move the loss and the norms visibly; the pad row lies in the
# second vocab shard, so its (shard-local) padding_idx is exercised too
CFG = OPTConfig.preset("debug", vocab_size=256, max_seq_len=32, init_std=0.02, pad_token_id=130)
STEPS, BATCH, SEQ, LR = 5, 4, 32, 1e-2
# the OPT-350M shape: post-LN, token embeddings narrower than the residual stream (project_in/out), recomputed layers
POST_LN = CFG.replace(pre_ln=False, word_embed_dim=32, activation_checkpointing=True)


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    """(STEPS, BATCH, SEQ) inputs and targets; the first 3 targets of every row are ignored (-100)."""
    g = torch.Generator().manual_seed(1)
    # every 5th id (pad included): a skewed unigram the model learns within a few steps, spread over both shards
    tokens = torch.randint(0, CFG.vocab_size // 5, (STEPS, BATCH, SEQ + 1), generator=g) * 5
    x, y = tokens[..., :-1].clone(), tokens[..., 1:].clone()
    y[..., :3] = -100  # the same count in every row, so per-dp-rank means average to the global mean
    return x, y


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _reference(cfg: OPTConfig, max_norm: float) -> dict:
    """One process, full batch, torch's own clipping."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core machine: threads only contend
    try:
        return _reference_run(cfg, max_norm)
    finally:
        torch.set_num_threads(threads)


def _reference_run(cfg: OPTConfig, max_norm: float) -> dict:
    torch.manual_seed(0)
    model = OPT(cfg)
    opt = _optimizer(model)
    x, y = _batches()
    losses, norms = [], []
    for step in range(STEPS):
        loss = model.loss(x[step], y[step])
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _train(cfg: OPTConfig, tp: int, fsdp: bool, max_norm: float) -> dict:
    """Runs on every rank: the reference's steps on a dp x tp layout, each dp rank on its slice of the batch."""
    layout = init_layout(tp, "cpu")
    torch.manual_seed(0)  # the same full-size init as the reference, then sliced
    model = tensor_parallel(OPT(cfg), layout)
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (cfg.d_model // tp, cfg.d_model) and attn.n_head == cfg.n_head // tp
    assert model.embed_tokens.weight.shape == (cfg.vocab_size // tp, cfg.embed_dim)
    if fsdp:
        model = shard_data_parallel(model, layout)
    opt = _optimizer(model)
    x, y = _batches()
    rows = slice(layout.dp_rank * BATCH // layout.dp, (layout.dp_rank + 1) * BATCH // layout.dp)
    losses, norms = [], []
    for step in range(STEPS):
        loss = model.loss(x[step, rows], y[step, rows])
        loss.backward()
        norms.append(clip_grad_norm_(model, max_norm, layout).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=layout.dp_group)
        losses.append(mean.item() / layout.dp)
    return {"losses": losses, "norms": norms, "state": full_state_dict(model, layout)}


def _assert_matches(results: list[dict], ref: dict) -> None:
    for rank, got in enumerate(results):
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4), f"rank {rank} loss curve"
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-4), f"rank {rank} grad norms"
        assert got["state"].keys() == ref["state"].keys()
        off = {}
        for key, want in ref["state"].items():
            have = got["state"][key]
            assert have.shape == want.shape, key
            # softmax is shift-invariant, so k_proj.bias has an analytically zero gradient: Adam divides its
            # roundoff by its own size and moves it by noise, ~lr at worst
            atol = 1e-3 if key.endswith("k_proj.bias") else 1e-5
            if not torch.allclose(have, want, rtol=1e-3, atol=atol):
                off[key] = (have - want).abs().max().item()
        assert not off, f"rank {rank}: parameters off the single-process run (max abs diff): {off}"


@pytest.mark.parametrize("cfg", [CFG, POST_LN], ids=["pre-ln", "post-ln-projected"])
def test_tp2_matches_single_process(cfg):
    ref = _reference(cfg, max_norm=1e3)
    assert ref["losses"][-1] < ref["losses"][0] - 0.1  # the run learns, so matching it means something
    _assert_matches(run_ranks(_train, 2, cfg, 2, False, 1e3), ref)


@pytest.mark.parametrize("tp, world", [(2, 4), (1, 2)], ids=["tp2xdp2", "tp1xdp2"])
def test_tp_x_fsdp_matches_single_process(tp, world):
    _assert_matches(run_ranks(_train, world, CFG, tp, True, 1e3), _reference(CFG, max_norm=1e3))


def test_clipping_matches_single_process():
    ref = _reference(CFG, max_norm=0.05)
    assert min(ref["norms"]) > 0.05  # clipping scales every step
    # FSDP2 on the size-1 dp mesh: the gradients are DTensors as well as tp shards
    _assert_matches(run_ranks(_train, 2, CFG, 2, True, 0.05), ref)


def test_world_not_divisible_by_tp(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 6)
    for tp in (4, 0):
        with pytest.raises(ValueError, match=f"tensor-parallel size {tp} must be >= 1 and divide the world size 6"):
            init_layout(tp, "cpu")


def test_model_not_divisible_by_tp():
    check_tensor_parallel(CFG, 4)
    with pytest.raises(ValueError, match=r"n_head \(4\) divisible by tp \(3\)"):
        check_tensor_parallel(CFG, 3)
    with pytest.raises(ValueError, match=r"ffn_dim \(102\) divisible by tp \(4\)"):
        check_tensor_parallel(CFG.replace(d_ffn=102), 4)
    with pytest.raises(ValueError, match=r"vocab_size \(250\) divisible by tp \(4\)"):
        check_tensor_parallel(CFG.replace(vocab_size=250), 4)
    # tensor_parallel validates before it touches any process group
    layout = ParallelLayout(dp=1, tp=3, dp_rank=0, tp_rank=0, mesh=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_head"):
        tensor_parallel(OPT(CFG), layout)
