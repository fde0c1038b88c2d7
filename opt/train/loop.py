"""The per-rank training loop Ray Train runs: FSDP2, OPT's AdamW recipe, sharded checkpoints, resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opt.config import RunConfig
from opt.data.loader import TrainBatches, open_train_sources
from opt.data.manifest import DatasetManifest
from opt.logbook import Logbook
from opt.model import OPT
from opt.model.plan import train_flops_per_token
from opt.train.checkpoint import latest_committed, local_copy, read_trainer_state, save_sharded
from opt.train.recipe import resolve
from opt.train.schedule import lr_at

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases and LayerNorm parameters are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=t.betas, eps=t.eps)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's step: no RNG state needs saving for a resume to be exact."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def accumulate_gradients(model: OPT, batches: TrainBatches, step: int, grad_accum: int, device: str) -> torch.Tensor:
    """Forward and backward over the step's `grad_accum` micro-batches; returns their mean loss.

    Micro-batch k of step s reads sample block s * grad_accum + k, so the data order depends only on
    the seed and the batch size in tokens. Under FSDP2 the gradient reduce-scatter runs once, after
    the last micro-batch.
    """
    total = torch.zeros((), device=device)
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # present once FSDP2 wraps the model
    for k in range(grad_accum):
        if callable(set_sync):
            set_sync(k == grad_accum - 1)
        x, y = batches.batch(step * grad_accum + k)
        loss = model.loss(x.to(device), y.to(device)) / grad_accum
        loss.backward()
        total += loss.detach()
    return total


def shard_model(model: OPT, world: int, device_type: str) -> OPT:
    """FSDP2: shard each decoder layer, then the root (embeddings, final LayerNorm)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_worker(payload: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker. `payload` holds plain data: the config and the manifest."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from opt.tracking import MetricsBuffer

    # Ray forwards worker logging once (printed lines twice), so progress goes through logging
    logging.getLogger("opt").setLevel(logging.INFO)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = RunConfig.model_validate(payload["config"])
    manifest = DatasetManifest.from_json(payload["manifest"])
    run_uri: str = payload["run_uri"]
    t = cfg.train
    device = "cuda" if t.use_gpu else "cpu"
    logbook = Logbook(run_uri)

    torch.manual_seed(t.seed)  # same init on every rank before sharding
    model_cfg = cfg.model.build(manifest.vocab_size, manifest.seq_len)
    model = shard_model(OPT(model_cfg).to(device), world, device)
    recipe = resolve(cfg.model.preset, manifest.seq_len, world, t.micro_batch_size, t.max_steps, t.lr, t.warmup_steps, t.batch_tokens)
    optimizer = build_optimizer(model, cfg, recipe.lr)

    start = 0
    skipped = (lambda uri, why: logbook.append("checkpoint_skipped", uri=uri, reason=why)) if rank == 0 else None
    ckpt = latest_committed(run_uri, on_skip=skipped)
    if ckpt is not None:
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(local_copy(ckpt, payload["cache_dir"])))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        start = read_trainer_state(ckpt)["step"]
        if rank == 0:
            logbook.append("resumed", step=start, checkpoint=ckpt.uri, world_size=world)

    batches = TrainBatches(open_train_sources(manifest, payload["cache_dir"]), manifest.seq_len, t.micro_batch_size, rank, world, t.seed)
    spill = Path(payload["cache_dir"]) / "metrics-pending" / f"{payload['mlflow_run_id']}.json"
    metrics = MetricsBuffer(cfg.tracking.uri, payload["mlflow_run_id"], spill_path=spill) if rank == 0 else None
    flops_per_token = train_flops_per_token(model_cfg, manifest.seq_len)
    tokens_per_step = recipe.batch_tokens
    last: dict[str, float] = {}
    model.train()
    for step in range(start, t.max_steps):
        t0 = time.perf_counter()
        # dropout masks are a function of (seed, step, rank), so a resumed run draws the same ones
        torch.manual_seed(step_seed(t.seed, step, rank))
        lr = lr_at(step, recipe.lr, recipe.warmup_steps, t.max_steps, t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = accumulate_gradients(model, batches, step, recipe.grad_accum, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG if device == "cuda" else dist.ReduceOp.SUM)
        if device != "cuda":  # gloo has no AVG
            mean_loss /= world
        dt = time.perf_counter() - t0
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        last = {
            "loss": mean_loss.item(),
            "lr": lr,
            "grad_norm": float(norm),
            "tokens_per_s": tokens_per_step / dt,
            "tflops_per_s": tokens_per_step * flops_per_token / dt / 1e12,
        }
        if metrics is not None:
            metrics.log(last, step + 1)
            if (step + 1) % 10 == 0 or step == start:
                log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step + 1, t.max_steps, last["loss"], lr, last["tokens_per_s"])
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.max_steps:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            trainer_state = {"step": step + 1, "seed": t.seed, "dataset_id": manifest.dataset_id, "model": model_cfg.to_dict()}
            uri = save_sharded({"model": model_sd, "optim": optim_sd}, trainer_state, run_uri, step + 1, rank, payload["cache_dir"])
            if rank == 0:
                logbook.append("checkpoint", step=step + 1, uri=uri, loss=last["loss"])
            ray.train.report({**last, "step": step + 1, "checkpoint": uri})
    if metrics is not None and not metrics.close():
        log.warning("some metrics could not be sent to MLflow yet; the next run of %s sends them", run_uri)
