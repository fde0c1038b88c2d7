"""Tensor parallelism (fairscale layers) x FSDP2 on real gloo ranks: training must match one process.

"Match" means within what fp32 roundoff allows, whatever CPU runs it (tests/numerics.py has the bounds and why):
the first step's gradients elementwise at the roundoff of their scale; after five SGD and five AdamW steps each
tensor's update as a whole within 1%, and AdamW's elementwise within Adam's own reach (2 lr a step); loss curves and
gradient norms at 1e-4. SGD is there because Adam is blind to the gradient's scale (clipping included). Two
deliberately broken layouts show that the same checks catch a real tensor-parallel bug, by far.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from opt.model import OPT, OPTConfig
from opt.train.tensor_parallel import (
    ParallelLayout,
    check_tensor_parallel,
    clip_grad_norm_,
    full_grads,
    full_state_dict,
    init_layout,
    shard_data_parallel,
    tensor_parallel,
)
from tests import numerics
from tests.distributed import run_ranks

# init_std 0.02 and lr 1e-2 so that five steps move the loss and the norms visibly; the pad row lies in the
# second vocab shard, so its (shard-local) padding_idx is exercised too
CFG = OPTConfig.preset("debug", vocab_size=256, max_seq_len=32, init_std=0.02, pad_token_id=130)
STEPS, BATCH, SEQ, LR = 5, 4, 32, 1e-2
# the OPT-350M shape: post-LN, token embeddings narrower than the residual stream (project_in/out), recomputed layers
POST_LN = CFG.replace(pre_ln=False, word_embed_dim=32, activation_checkpointing=True)
OPTIMIZERS = ("adamw", "sgd")
CURVE_REL = 1e-4  # loss curves and gradient norms: means over every token and parameter, far steadier than elements


def _sgd_lr(cfg: OPTConfig) -> float:
    # the largest rate at which the loss falls steadily for five steps (post-LN's gradients are smaller)
    return 0.3 if cfg.pre_ln else 1.0


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    """(STEPS, BATCH, SEQ) inputs and targets; the first 3 targets of every row are ignored (-100)."""
    g = torch.Generator().manual_seed(1)
    # every 5th id (pad included): a skewed unigram the model learns within a few steps, spread over both shards
    tokens = torch.randint(0, CFG.vocab_size // 5, (STEPS, BATCH, SEQ + 1), generator=g) * 5
    x, y = tokens[..., :-1].clone(), tokens[..., 1:].clone()
    y[..., :3] = -100  # the same count in every row, so per-dp-rank means average to the global mean
    return x, y


def _optimizer(model: torch.nn.Module, kind: str, cfg: OPTConfig) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=_sgd_lr(cfg), momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _reference(cfg: OPTConfig, max_norm: float) -> dict:
    """One process, full batch, torch's own clipping: a run per optimizer, the first step's gradients, the init."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core machine: threads only contend
    try:
        torch.manual_seed(0)
        out: dict = {"start": {k: v.detach().clone() for k, v in OPT(cfg).state_dict().items()}}
        for kind in OPTIMIZERS:
            torch.manual_seed(0)
            model = OPT(cfg)
            clip = lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)  # noqa: E731
            out[kind] = _steps(model, _optimizer(model, kind, cfg), slice(None), clip)
            out[kind]["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return out
    finally:
        torch.set_num_threads(threads)


def _steps(model, opt, rows: slice, clip, gather_grads=None, dp_group=None, dp: int = 1) -> dict:
    x, y = _batches()
    losses, norms, grads = [], [], None
    for step in range(STEPS):
        loss = model.loss(x[step, rows], y[step, rows])
        loss.backward()
        if step == 0:  # before clipping: the gradient of the loss itself
            grads = gather_grads(model) if gather_grads else {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        norms.append(clip(model).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if dp_group is not None:
            dist.all_reduce(mean, group=dp_group)
        losses.append(mean.item() / dp)
    return {"losses": losses, "norms": norms, "grads": grads}


def _skip_row_all_reduce(layer: torch.nn.Module) -> None:
    """Bug: a row-parallel layer that adds its partial product without summing it over the tp ranks (forward)."""
    layer.forward = lambda x: F.linear(x, layer.weight) + layer.bias  # type: ignore[method-assign]


def _skip_column_grad_all_reduce(layer: torch.nn.Module) -> None:
    """Bug: a column-parallel layer whose input gradient is not summed over the tp ranks (backward only: the
    forward, and so the first loss, are exactly right)."""
    layer.forward = lambda x: F.linear(x, layer.weight, layer.bias)  # type: ignore[method-assign]


BUGS = {
    "row-forward": lambda m: _skip_row_all_reduce(m.layers[1].fc2),
    "column-backward": lambda m: _skip_column_grad_all_reduce(m.layers[0].fc1),
}


def _train(cfg: OPTConfig, tp: int, fsdp: bool, max_norm: float, bug: str | None = None) -> dict:
    """Runs on every rank: the reference's runs on a dp x tp layout, each dp rank on its slice of the batch."""
    layout = init_layout(tp, "cpu")
    rows = slice(layout.dp_rank * BATCH // layout.dp, (layout.dp_rank + 1) * BATCH // layout.dp)
    out = {}
    for kind in OPTIMIZERS:
        torch.manual_seed(0)  # the same full-size init as the reference, then sliced
        model = tensor_parallel(OPT(cfg), layout)
        attn = model.layers[0].self_attn
        assert attn.q_proj.weight.shape == (cfg.d_model // tp, cfg.d_model) and attn.n_head == cfg.n_head // tp
        assert model.embed_tokens.weight.shape == (cfg.vocab_size // tp, cfg.embed_dim)
        if bug:
            BUGS[bug](model)
        if fsdp:
            model = shard_data_parallel(model, layout)
        run = _steps(
            model, _optimizer(model, kind, cfg), rows, lambda m: clip_grad_norm_(m, max_norm, layout),
            gather_grads=lambda m: full_grads(m, layout), dp_group=layout.dp_group, dp=layout.dp,
        )  # fmt: skip
        out[kind] = {**run, "state": full_state_dict(model, layout)}
    return out


def _usage(got: dict, ref: dict) -> dict[str, dict[str, float]]:
    """check -> tensor (or curve) -> share of its tolerance used; above 1 is a mismatch."""

    def curve(a: list[float], b: list[float]) -> dict[str, float]:
        return {f"step {i}": abs(x - y) / (CURVE_REL * abs(y)) for i, (x, y) in enumerate(zip(a, b, strict=True))}

    sgd, adamw = got["sgd"], got["adamw"]
    params = [k for k in ref["start"] if k in ref["adamw"]["grads"]]  # trained parameters (no buffers)
    pick = lambda d: {k: d[k] for k in params}  # noqa: E731
    noise = numerics.analytically_zero(params)
    assert noise and noise <= numerics.at_roundoff(ref["adamw"]["grads"])  # the reference agrees it is zero
    return {
        "first-step gradients": numerics.roundoff_usage(adamw["grads"], ref["adamw"]["grads"]),
        "sgd parameters": numerics.update_usage(pick(sgd["state"]), pick(ref["sgd"]["state"]), pick(ref["start"])),
        # k_proj.bias's gradient is analytically zero: Adam moves it by noise alone, so only its reach is compared
        "adamw parameters": numerics.update_usage(pick(adamw["state"]), pick(ref["adamw"]["state"]), pick(ref["start"]), skip=noise),
        "adamw reach": numerics.adam_reach_usage(pick(adamw["state"]), pick(ref["adamw"]["state"]), LR, STEPS),
        **{f"{kind} {what}": curve(got[kind][what], ref[kind][what]) for kind in OPTIMIZERS for what in ("losses", "norms")},
    }


def _assert_matches(results: list[dict], ref: dict) -> None:
    for rank, got in enumerate(results):
        for kind in OPTIMIZERS:
            assert got[kind]["state"].keys() == ref[kind]["state"].keys(), f"rank {rank}: {kind} state dict keys"
        for check, usage in _usage(got, ref).items():
            numerics.assert_within(usage, f"rank {rank}: {check} against the single-process run")


@pytest.mark.parametrize("cfg", [CFG, POST_LN], ids=["pre-ln", "post-ln-projected"])
def test_tp2_matches_single_process(cfg):
    ref = _reference(cfg, max_norm=1e3)
    for kind in OPTIMIZERS:  # both runs learn, so matching them means something
        assert ref[kind]["losses"][-1] < ref[kind]["losses"][0] - 0.1, kind
    _assert_matches(run_ranks(_train, 2, cfg, 2, False, 1e3), ref)


@pytest.mark.parametrize("cfg", [CFG, POST_LN], ids=["pre-ln", "post-ln-projected"])
def test_tp2_x_fsdp2_matches_single_process(cfg):
    _assert_matches(run_ranks(_train, 4, cfg, 2, True, 1e3), _reference(cfg, max_norm=1e3))


def test_fsdp2_alone_matches_single_process():
    _assert_matches(run_ranks(_train, 2, CFG, 1, True, 1e3), _reference(CFG, max_norm=1e3))


def test_clipping_matches_single_process():
    ref = _reference(CFG, max_norm=0.05)
    assert min(ref["adamw"]["norms"]) > 0.05 and min(ref["sgd"]["norms"]) > 0.05  # clipping scales every step
    # FSDP2 on the size-1 dp mesh: the gradients are DTensors as well as tp shards
    _assert_matches(run_ranks(_train, 2, CFG, 2, True, 0.05), ref)


@pytest.mark.parametrize("bug", list(BUGS))
def test_the_checks_catch_a_broken_layout(bug):
    """A skipped all-reduce in one layer fails the gradient check by orders of magnitude and both parameter checks
    in several tensors by well over their tolerance, where correct layouts use a few percent of it."""
    ref = _reference(CFG, max_norm=1e3)
    got = run_ranks(_train, 2, CFG, 2, False, 1e3, bug)[0]
    usage = _usage(got, ref)
    for check, least in (("first-step gradients", 1e3), ("sgd parameters", 10), ("adamw parameters", 10)):
        name, share = numerics.worst(usage[check])
        assert share > least, f"{bug}: {check} used only {share:.2f} of its tolerance ({name})"
        assert len(numerics.off(usage[check])) >= 5, f"{bug}: {check} off in only {sorted(numerics.off(usage[check]))}"
    if bug == "column-backward":  # a backward-only bug: the first loss is right, only the gradients show it
        assert usage["adamw losses"]["step 0"] <= 1


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
