"""fairscale's FSDP backend: refused on CPU with a message; its checkpoints, with fairscale's real sharding.

fairscale's FSDP cannot run forward or backward without CUDA (it drives CUDA streams), so training
steps are checked on a GPU machine (bench/gpu_fairscale_check.py). What runs here is everything up to
that: the wrapper shards the parameters in its constructor, and the flat DTensor checkpoint of model
and optimizer state is saved on N real gloo ranks and loaded on M.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from opt.config import TrainConfig, load_config
from opt.model import OPT, OPTConfig
from tests.distributed import run_ranks

CFG = OPTConfig.preset("debug")


def test_fairscale_without_a_gpu_is_refused_with_the_way_out() -> None:
    with pytest.raises(ValidationError, match=r"train.fsdp=fairscale runs on CUDA only.*train.use_gpu=true.*train.fsdp=fsdp2"):
        TrainConfig(fsdp="fairscale")
    with pytest.raises(ValidationError, match="tensor_parallel"):
        TrainConfig(fsdp="fairscale", use_gpu=True, tensor_parallel=2, num_workers=2)
    with pytest.raises(ValidationError, match="async_checkpoint"):
        TrainConfig(fsdp="fairscale", use_gpu=True, async_checkpoint=True)
    assert TrainConfig(fsdp="fairscale", use_gpu=True).fsdp == "fairscale"
    assert load_config(None, []).train.fsdp == "fsdp2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_wrapping_without_cuda_raises_the_same_message() -> None:
    from opt.train.fairscale_fsdp import wrap

    with pytest.raises(RuntimeError, match="runs on CUDA only"):
        wrap(OPT(CFG), "bf16")


def _sharded(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """OPT wrapped by fairscale on CPU (construction only: no forward), with an optimizer that has stepped."""
    from opt.train.fairscale_fsdp import wrap
    from opt.train.optim import build_optimizer

    torch.manual_seed(0)
    model = wrap(OPT(CFG), "fp32", device=torch.device("cpu"))
    optimizer = build_optimizer("adamw", model, TrainConfig(), 1e-2)
    g = torch.Generator().manual_seed(seed + torch.distributed.get_rank())
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()
    return model, optimizer


def _full(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every rank's unpadded pieces, gathered and reshaped: the whole tensors the checkpoint must hold."""
    import torch.distributed as dist

    from opt.train.fairscale_fsdp import _clean, _span, full_shape

    world, out = dist.get_world_size(), {}
    for name, p in model.named_parameters():
        shape = full_shape(p)
        for key, local in [("w", p.data), *((k, v) for k, v in optimizer.state[p].items() if k != "step")]:
            pieces: list[torch.Tensor] = [torch.empty(0)] * world
            dist.all_gather_object(pieces, local.reshape(-1).clone())
            flat = torch.cat([pieces[r][: _span(shape.numel(), world, r)[1]] for r in range(world)])
            out[f"{_clean(name)}:{key}"] = flat.view(shape)
    return out


def _save(root: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    from opt.train.fairscale_fsdp import model_state, optimizer_state

    model, optimizer = _sharded(seed=1)
    dcp.save({"model": model_state(model), "optim": optimizer_state(model, optimizer)}, checkpoint_id=root)
    return _full(model, optimizer)


def _load(root: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    from opt.train.fairscale_fsdp import load_optimizer_state, model_state, optimizer_state

    model, optimizer = _sharded(seed=2)  # other gradients: every loaded value must come from the checkpoint
    optimizer.param_groups[0]["lr"] = 123.0
    sd = {"model": model_state(model), "optim": optimizer_state(model, optimizer)}
    dcp.load(sd, checkpoint_id=root)
    load_optimizer_state(optimizer, sd["optim"])
    assert optimizer.param_groups[0]["lr"] == 1e-2
    step = next(iter(optimizer.state.values()))["step"]
    assert float(step) == 1.0
    return _full(model, optimizer)


@pytest.mark.parametrize(("saved_on", "loaded_on"), [(2, 2), (2, 1), (1, 2)])
def test_checkpoint_saved_on_n_ranks_loads_on_m(saved_on: int, loaded_on: int, tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    saved = run_ranks(_save, saved_on, root)[0]
    for loaded in run_ranks(_load, loaded_on, root):
        assert saved.keys() == loaded.keys()
        for key in saved:
            assert torch.equal(saved[key], loaded[key]), key
    # fairscale really sharded the parameters of the two-rank runs: the test would pass trivially otherwise
    assert any(k.endswith(":exp_avg") for k in saved)


def _sharded_shapes() -> tuple[dict[str, tuple[int, ...]], int]:
    from opt.train.optim import param_groups

    model, _ = _sharded(seed=0)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}, len(param_groups(model, 0.1)[0]["params"])


def test_parameters_are_really_sharded_and_decay_groups_follow_whole_shapes() -> None:
    shapes, decayed = run_ranks(_sharded_shapes, 2)[0]
    assert shapes and all(len(s) == 1 for s in shapes.values())  # flat shards
    # the same split as the whole model's: matrices decay, biases and LayerNorms do not
    assert decayed == sum(1 for p in OPT(CFG).parameters() if p.ndim >= 2)


def _save_committed(run_uri: str, staging: str) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    from opt.train.checkpoint import save_sharded
    from opt.train.fairscale_fsdp import model_state, optimizer_state

    model, optimizer = _sharded(seed=3)
    state = {"model": model_state(model), "optim": optimizer_state(model, optimizer)}
    trainer = {"step": 1, "model": CFG.to_dict(), "tensor_parallel": 1, "fsdp": "fairscale"}
    save_sharded(state, trainer, run_uri, 1, dist.get_rank(), staging)
    return _full(model, optimizer)


def test_export_reshapes_a_fairscale_checkpoint_into_the_whole_model(tmp_path: Path) -> None:
    from opt.train.checkpoint import latest_committed
    from opt.train.export import load_checkpoint_model

    full = run_ranks(_save_committed, 2, str(tmp_path / "run"), str(tmp_path / "staging"))[0]
    ckpt = latest_committed(str(tmp_path / "run"))
    assert ckpt is not None and ckpt.step == 1
    model = load_checkpoint_model(ckpt, tmp_path / "cache")
    weights = model.state_dict()
    assert weights.keys() == {k.removesuffix(":w") for k in full if k.endswith(":w")}
    for name, w in weights.items():
        assert torch.equal(w, full[f"{name}:w"]), name


def _resume_with_fsdp2(run_uri: str, cache: str) -> str:
    from opt.config import RunConfig
    from opt.train.checkpoint import latest_committed
    from opt.train.loop import Trainer
    from opt.train.recipe import resolve

    cfg = RunConfig.model_validate({"model": {"preset": "debug"}, "train": {"num_workers": 1}})
    recipe = resolve("debug", 32, 1, 4, 8, 1e-3, 2)
    trainer = Trainer(cfg, CFG, recipe, 0, 1, "cpu")
    ckpt = latest_committed(run_uri)
    assert ckpt is not None
    try:
        trainer.restore(ckpt, cache)
    except ValueError as e:
        return str(e)
    return "resumed"


def test_an_fsdp2_run_refuses_a_fairscale_checkpoint_with_the_reason(tmp_path: Path) -> None:
    run_ranks(_save_committed, 2, str(tmp_path / "run"), str(tmp_path / "staging"))
    message = run_ranks(_resume_with_fsdp2, 1, str(tmp_path / "run"), str(tmp_path / "cache"))[0]
    assert "written with train.fsdp=fairscale" in message and "resume with the same backend" in message
