"""The per-rank training loop: FSDP2, OPT's recipe, sharded checkpoints, exact resume, spike rollbacks.

`train_worker` is what Ray Train runs on each worker; it calls `run_training`, which needs only an
initialised process group, so tests run it on plain gloo ranks too.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from opt.config import RunConfig, TrainConfig
from opt.data.loader import TrainBatches, open_train_sources
from opt.data.manifest import DatasetManifest
from opt.logbook import Logbook
from opt.model import OPT, OPTConfig
from opt.model.plan import train_flops_per_token
from opt.tracking import MetricsBuffer
from opt.train import spikes
from opt.train.checkpoint import (
    CommittedCheckpoint,
    PendingSave,
    all_ranks_done,
    begin_save,
    finish_save,
    latest_committed,
    local_copy,
    prune,
    read_trainer_state,
)
from opt.train.metrics_sink import SinkClient, spill_path
from opt.train.optim import apply_hparams, build_optimizer, hparams
from opt.train.recipe import ResolvedRecipe, resolve
from opt.train.schedule import lr_at

log = logging.getLogger(__name__)

# dense bf16 TFLOP/s per GPU from the datasheets, for MFU when train.peak_tflops is not set
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's step: no RNG state needs saving for a resume to be exact."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def chaos_factor(t: TrainConfig, data_step: int) -> float:
    """The factor fault injection applies to this data step's loss (1.0 when none)."""
    if data_step in t.chaos.nan_batches:
        return math.nan
    return t.chaos.poison_scale if data_step in t.chaos.poison_batches else 1.0


def _drill(t: TrainConfig, step: int, rank: int, world: int, attempt: int | None, node: str | None) -> None:
    """Fault injection (train.chaos) at the start of a step; nothing happens in a real run."""
    c = t.chaos
    time.sleep(c.step_sleep_s)
    if node is not None and node in c.crash_on_nodes:
        raise RuntimeError(f"chaos: node {node} fails (train.chaos.crash_on_nodes)")
    if c.crash_at_step == step and rank == 0:
        raise RuntimeError(f"chaos: rank 0 crashes at step {step} (train.chaos.crash_at_step)")
    if c.hang_at_step == step and rank == world - 1 and attempt in (None, 1):
        log.warning("chaos: rank %d stops answering at step %d (train.chaos.hang_at_step)", rank, step)
        time.sleep(10**6)


def accumulate_gradients(
    model: OPT, batches: TrainBatches, data_step: int, grad_accum: int, device: str, factor: float = 1.0
) -> torch.Tensor:
    """Forward and backward over the step's `grad_accum` micro-batches; returns their mean loss.

    Micro-batch k of data step s reads sample block s * grad_accum + k, so the data order depends only
    on the seed and the batch size in tokens. Under FSDP2 the gradient reduce-scatter runs once, after
    the last micro-batch.
    """
    total = torch.zeros((), device=device)
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # present once FSDP2 wraps the model
    for k in range(grad_accum):
        if callable(set_sync):
            set_sync(k == grad_accum - 1)
        x, y = batches.batch(data_step * grad_accum + k)
        # through the module call (same as model.loss): FSDP wrappers gather their parameters in forward
        loss = model(x.to(device), y.to(device)) * (factor / grad_accum)
        loss.backward()
        total += loss.detach()
    return total


def shard_model(model: OPT, world: int, device_type: str, precision: str = "fp32") -> OPT:
    """FSDP2: shard each decoder layer, then the root (embeddings, final LayerNorm)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (world,))
    # bf16 compute with fp32 master weights and fp32 gradient reduction (GPU only)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _process_start() -> float:
    """When this process started (epoch seconds), from /proc; now if unknown."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def memory_gb(device: str) -> float:
    """Peak memory of this rank: allocated GPU memory, or the process's peak resident set on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kb / 2**20
    except (OSError, StopIteration):
        return math.nan


def peak_tflops(t: TrainConfig, device: str) -> float | None:
    if t.peak_tflops is not None:
        return t.peak_tflops
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


@dataclass
class Trainer:
    """One rank's model, optimizers and run state; `restore` loads them from a committed checkpoint."""

    cfg: RunConfig
    model_cfg: OPTConfig
    recipe: ResolvedRecipe
    rank: int
    world: int
    device: str
    model: OPT = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    dormant: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    """Optimizers switched away from, kept (and checkpointed) so switching back restores their state."""
    step: int = 0
    state: spikes.SpikeState = field(default_factory=spikes.SpikeState)
    layout: Any = None
    """The dp x tp `ParallelLayout` when train.tensor_parallel > 1, else None (pure FSDP2 over all ranks)."""

    def __post_init__(self) -> None:
        if self.cfg.train.tensor_parallel > 1:
            from opt.train.tensor_parallel import init_layout

            self.layout = init_layout(self.cfg.train.tensor_parallel, self.device)
        self.fresh()

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank if self.layout is not None else self.rank

    @property
    def dp(self) -> int:
        return self.layout.dp if self.layout is not None else self.world

    def clip_gradients(self) -> float:
        """Clip to train.grad_clip; returns the global gradient norm before clipping (the same on every rank)."""
        max_norm = self.cfg.train.grad_clip
        if self.layout is not None:
            from opt.train.tensor_parallel import clip_grad_norm_

            return float(clip_grad_norm_(self.model, max_norm, self.layout))
        if self.cfg.train.fsdp == "fairscale":
            return float(cast(Any, self.model).clip_grad_norm_(max_norm))  # fairscale's: the norm over every rank's shards
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _per_tp_rank(self, sd: dict[str, Any]) -> dict[str, Any]:
        # tp ranks hold different tensors under the same names: one key per tp rank keeps DCP from merging them
        return {f"tp{self.layout.tp_rank}": sd} if self.layout is not None else sd

    def fresh(self) -> None:
        """The initial weights (the same on every rank before sharding) and a new optimizer."""
        t = self.cfg.train
        torch.manual_seed(t.seed)
        precision = t.precision if self.device == "cuda" else "fp32"
        model = OPT(self.model_cfg).to(self.device)
        if t.fsdp == "fairscale":
            from opt.train.fairscale_fsdp import wrap

            self.model = cast(OPT, wrap(model, precision))  # fairscale's wrapper: calls and attributes reach the OPT
        elif self.layout is None:
            self.model = shard_model(model, self.world, self.device, precision)
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            from opt.train.tensor_parallel import shard_data_parallel, tensor_parallel

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
            self.model = shard_data_parallel(tensor_parallel(model, self.layout), self.layout, mp)
        self.optimizer = build_optimizer(t.optimizer, self.model, t, self.recipe.lr)
        self.dormant = {}
        self.step, self.state = 0, spikes.SpikeState()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds: model, active optimizer and dormant optimizers (per tp rank under TP)."""
        get_model_state_dict, get_optimizer_state_dict, _, _ = _state_api(self.cfg.train.fsdp)
        sd: dict[str, Any] = {
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
        }
        if self.dormant:
            sd["dormant"] = {name: get_optimizer_state_dict(self.model, o) for name, o in self.dormant.items()}
        return self._per_tp_rank(sd)

    def trainer_state(self, manifest: DatasetManifest) -> dict[str, Any]:
        t = self.cfg.train
        return {
            "step": self.step,
            "seed": t.seed,
            "dataset_id": manifest.dataset_id,
            "model": self.model_cfg.to_dict(),
            "hparams": hparams(t, self.recipe.lr),
            "dormant_optimizers": sorted(self.dormant),
            "spikes": self.state.to_dict(),
            "tensor_parallel": t.tensor_parallel,
            "fsdp": t.fsdp,
        }

    def restore(self, ckpt: CommittedCheckpoint, cache_dir: str) -> dict[str, Any]:
        """Load weights, optimizer state and run state; the configured optimizer and settings take over."""
        import torch.distributed.checkpoint as dcp

        t = self.cfg.train
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict = _state_api(t.fsdp)
        saved = read_trainer_state(ckpt)
        if saved.get("tensor_parallel", 1) != t.tensor_parallel:
            raise ValueError(
                f"{ckpt.uri} was written with train.tensor_parallel={saved.get('tensor_parallel', 1)}; resume with the same "
                "(the data-parallel size may change)"
            )
        if saved.get("fsdp", "fsdp2") != t.fsdp:
            raise ValueError(
                f"{ckpt.uri} was written with train.fsdp={saved.get('fsdp', 'fsdp2')} (its tensors are stored differently); "
                "resume with the same backend, or export the model and start a new run from it"
            )
        saved_name = saved.get("hparams", {}).get("optimizer", "adamw")
        names = [saved_name, *saved.get("dormant_optimizers", [])]
        optims = {name: build_optimizer(name, self.model, t, self.recipe.lr) for name in names}
        sd: dict[str, Any] = {
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, optims[saved_name]),
        }
        if len(names) > 1:
            sd["dormant"] = {name: get_optimizer_state_dict(self.model, optims[name]) for name in names[1:]}
        dcp.load(self._per_tp_rank(sd), checkpoint_id=str(local_copy(ckpt, cache_dir)))
        set_model_state_dict(self.model, sd["model"])
        for name, o in optims.items():
            set_optimizer_state_dict(self.model, o, sd["optim"] if name == saved_name else sd["dormant"][name])
        # the configured optimizer becomes active: its saved state if it has one, else a fresh one
        self.optimizer = optims.pop(t.optimizer) if t.optimizer in optims else build_optimizer(t.optimizer, self.model, t, self.recipe.lr)
        apply_hparams(self.optimizer, t)
        self.dormant = optims
        self.step = saved["step"]
        self.state = spikes.SpikeState.from_dict(saved.get("spikes"))
        return saved


def _current_attempt(payload: dict[str, Any], logbook: Logbook | None) -> int | None:
    """This attempt's number, the same on every rank. Ray Train restarts in place with the same payload, so
    rank 0 takes the newest `restart` the restart policy logged since this trainer started, if any."""
    attempt, since = payload.get("attempt"), payload.get("trainer_started")
    if logbook is not None and attempt is not None and since is not None:
        restarts = [e["attempt"] for e in logbook.read() if e["event"] == "restart" and e.get("t", 0) >= since]
        attempt = max([attempt, *restarts])
    box = [attempt]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _state_api(fsdp: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """get/set of model and optimizer state dicts for `dcp`: torch's (FSDP2, TP) or fairscale's flat shards."""
    if fsdp == "fairscale":
        from opt.train import fairscale_fsdp as fs

        def set_model(model: Any, sd: Any) -> None:
            pass  # `dcp.load` has loaded in place: fairscale's state dict tensors are views of the parameters

        def set_optim(model: Any, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
            fs.load_optimizer_state(optimizer, sd)

        return fs.model_state, fs.optimizer_state, set_model, set_optim
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    return get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict


def run_training(
    payload: dict[str, Any], rank: int, world: int, report: Callable[[dict[str, Any]], None] | None = None, node: str | None = None
) -> Trainer:
    """Train from the newest committed checkpoint (or from scratch) to `train.max_steps` on this rank.

    Needs an initialised default process group. `payload` holds plain data: the config, the manifest,
    the run URI, the MLflow run id and a local cache dir; under the driver also `metrics_sink`, the run's
    metrics actor (without it rank 0 sends to MLflow itself). Returns this rank's trainer as it ended.
    """
    cfg = RunConfig.model_validate(payload["config"])
    manifest = DatasetManifest.from_json(payload["manifest"])
    run_uri: str = payload["run_uri"]
    cache_dir: str = payload["cache_dir"]
    t = cfg.train
    device = "cuda" if t.use_gpu else "cpu"
    logbook = Logbook(run_uri) if rank == 0 else None
    # every tp group reads one data-parallel share: the batch is split over dp ranks only
    dp = world // t.tensor_parallel
    recipe = resolve(cfg.model.preset, manifest.seq_len, dp, t.micro_batch_size, t.max_steps, t.lr, t.warmup_steps, t.batch_tokens)
    entered = time.time()
    trainer = Trainer(cfg, cfg.model.build(manifest.vocab_size, manifest.seq_len), recipe, rank, world, device)
    built = time.time()

    def note(event: str, **fields: Any) -> None:
        if logbook is not None:
            logbook.append(event, **fields)

    attempt = _current_attempt(payload, logbook)
    ckpt = latest_committed(run_uri, on_skip=lambda uri, why: note("checkpoint_skipped", uri=uri, reason=why))
    if ckpt is not None:
        trainer.restore(ckpt, cache_dir)
        note("resumed", step=trainer.step, checkpoint=ckpt.uri, world_size=world, optimizer=t.optimizer)

    # who runs this attempt, so the driver can name the node of a failed rank
    workers: list[Any] = [None] * world
    dist.all_gather_object(workers, {"node": node, "host": socket.gethostname()})
    # where a restart's time goes: process start and imports, model build, checkpoint load
    now = time.time()
    setup = {"process_s": round(entered - _process_start(), 2), "build_s": round(built - entered, 2), "load_s": round(now - built, 2)}
    note("workers_started", attempt=attempt, step=trainer.step, world_size=world,
         workers={str(r): w for r, w in enumerate(workers)}, setup=setup)  # fmt: skip
    attempt_start, first_step = time.time(), True
    batches = TrainBatches(
        open_train_sources(manifest, cache_dir), manifest.seq_len, t.micro_batch_size, trainer.dp_rank, trainer.dp, t.seed
    )
    metrics = _metrics(payload, cfg) if rank == 0 else None
    flops_per_token = train_flops_per_token(trainer.model_cfg, manifest.seq_len)
    peak = peak_tflops(t, device)
    background = dist.new_group(backend="gloo") if t.async_checkpoint else None
    pending: PendingSave | None = None

    def commit(p: PendingSave) -> None:
        uri = finish_save(p, rank)
        if metrics is not None:  # the points up to a committed step leave this process now
            metrics.send_soon()
        if rank == 0:
            note("checkpoint", step=p.step, uri=uri, loss=p.trainer_state.get("loss"))
            if deleted := prune(run_uri, t.keep_checkpoints, t.keep_every):
                note("checkpoints_deleted", steps=deleted, keep=t.keep_checkpoints, keep_every=t.keep_every)
        if report is not None:
            report({**p.trainer_state.get("metrics", {}), "step": p.step, "checkpoint": uri})

    trainer.model.train()
    while trainer.step < t.end_step:
        step = trainer.step
        if pending is not None and all_ranks_done(pending, device):
            commit(pending)
            pending = None
        _drill(t, step, rank, world, attempt, node)
        t0 = time.perf_counter()
        # dropout masks are a function of (seed, step, dp rank), so a resumed run draws the same ones; the
        # ranks of a tp group share the seed, so their replicated activations stay identical
        torch.manual_seed(step_seed(t.seed, step, trainer.dp_rank))
        lr = lr_at(step, recipe.lr, recipe.warmup_steps, t.max_steps, t.min_lr_ratio) * trainer.state.lr_scale
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        data_step = step + trainer.state.data_offset
        loss = accumulate_gradients(trainer.model, batches, data_step, recipe.grad_accum, device, chaos_factor(t, data_step))
        norm = trainer.clip_gradients()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # gloo has no AVG
        mean_loss /= world
        loss_value = mean_loss.item()
        # every rank sees the same reduced loss and norm, so every rank takes the same decision
        reason = spikes.spike_reason(t.spikes, trainer.state, loss_value, norm) if t.spikes.enabled else None
        if reason is not None:
            trainer.optimizer.zero_grad(set_to_none=True)
            if pending is not None:  # the checkpoint being written was healthy: it may be the one to go back to
                commit(pending)
                pending = None
            note("spike", step=step + 1, data_step=data_step, reason=reason, loss=loss_value, grad_norm=norm)
            if trainer.state.rollbacks >= t.spikes.max_rollbacks:
                note("spike_gave_up", step=step + 1, reason=reason, rollbacks=trainer.state.rollbacks)
                log.error("giving up at step %d after %d rollbacks: %s", step + 1, trainer.state.rollbacks, reason)
                break
            current = trainer.state
            good = latest_committed(run_uri, on_skip=lambda uri, why: note("checkpoint_skipped", uri=uri, reason=why))
            if good is None:
                trainer.fresh()
            else:
                trainer.restore(good, cache_dir)
            trainer.state = spikes.after_rollback(t.spikes, trainer.state, current, trainer.step, step)
            trainer.model.train()
            skipped = [data_step - (step - trainer.step), data_step]
            note("rollback", to_step=trainer.step, checkpoint=good.uri if good else None, skipped_data_steps=skipped,
                 lr_scale=trainer.state.lr_scale, rollbacks=trainer.state.rollbacks)  # fmt: skip
            if metrics is not None:
                metrics.log({"spike_rollbacks": trainer.state.rollbacks, "lr_scale": trainer.state.lr_scale}, step + 1)
            log.warning("spike at step %d (%s): back to step %d, LR x%.3g", step + 1, reason, trainer.step, trainer.state.lr_scale)
            continue
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state = spikes.observe(t.spikes, trainer.state, loss_value)
        trainer.step = step + 1
        if first_step:  # the end of a restart: from here on the attempt does new work
            note("first_step", attempt=attempt, step=step + 1, seconds_after_start=round(time.time() - attempt_start, 3))
            first_step = False
        dt = time.perf_counter() - t0
        tflops = recipe.batch_tokens * flops_per_token / dt / 1e12
        last = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": norm,
            "tokens_per_s": recipe.batch_tokens / dt,
            "tflops_per_s": tflops,
            "memory_gb": memory_gb(device),
        }
        if peak is not None:
            last["mfu"] = tflops / world / peak
        if metrics is not None:
            metrics.log(last, step + 1)
            if (step + 1) % 10 == 0 or step == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step + 1, t.max_steps, loss_value, lr, last["tokens_per_s"])
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.end_step:
            if pending is not None:  # one save in flight at a time
                commit(pending)
            state = {**trainer.trainer_state(manifest), "loss": loss_value, "metrics": last}
            pending = begin_save(trainer.state_dict(), state, run_uri, step + 1, rank, cache_dir, background)
            time.sleep(t.chaos.checkpoint_sleep_s)
            if background is None:
                commit(pending)
                pending = None
    if pending is not None:
        commit(pending)
    if metrics is not None and not metrics.close():
        log.warning("some metrics could not be sent to MLflow yet; the next run of %s sends them", run_uri)
    return trainer


def _metrics(payload: dict[str, Any], cfg: RunConfig) -> MetricsBuffer | SinkClient:
    """Rank 0's metrics: through the run's sink actor when the driver started one (see
    opt/train/metrics_sink.py), else straight to MLflow from this process."""
    spill = spill_path(payload["cache_dir"], payload["mlflow_run_id"])

    def local() -> MetricsBuffer:
        return MetricsBuffer(cfg.tracking.uri, payload["mlflow_run_id"], spill_path=spill)

    sink = payload.get("metrics_sink")
    return SinkClient(sink, local) if sink is not None else local()


def train_worker(payload: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker (Ray has set up the process group)."""
    import ray
    import ray.train

    # Ray forwards worker logging once (printed lines twice), so progress goes through logging
    logging.getLogger("opt").setLevel(logging.INFO)
    ctx = ray.train.get_context()
    node = ray.get_runtime_context().get_node_id()
    run_training(payload, ctx.get_world_rank(), ctx.get_world_size(), report=ray.train.report, node=node)
