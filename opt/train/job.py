"""The training driver: launches Ray Train's TorchTrainer over `train_worker` and records the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opt import storage
from opt.config import RunConfig, TrainConfig
from opt.data.manifest import DatasetManifest
from opt.errors import OptError
from opt.logbook import Logbook
from opt.train.checkpoint import CommittedCheckpoint, latest_committed, read_trainer_state
from opt.train.interrupts import Interrupt, TrainingInterrupted, abort_then_raise, raise_if_stopped, stop_signals_raise
from opt.train.lease import acquire, describe
from opt.train.preflight import check_ray_address, check_resume

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


class TrainingError(OptError):
    """Training could not complete; the message says why and the logbook has the details."""


@dataclass(frozen=True)
class TrainResult:
    run_uri: str
    mlflow_run_id: str
    checkpoint: CommittedCheckpoint
    metrics: dict


def run_uri(cfg: RunConfig) -> str:
    return storage.join(cfg.storage.root, "runs", cfg.train.run)


def work_dir(cfg: RunConfig) -> Path:
    """Local scratch space (download cache, staging) beside the embedded defaults."""
    return Path(os.environ.get("OPT_HOME", ".opt")).resolve()


def _ray_init(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    from opt.console import quiet, stderr_to_log_file

    # A local instance by default; a cluster by address. Quiet (optctl without -v): the driver prints its own
    # progress; the workers' output and Ray's C++ start-up lines go to the command's log file
    with stderr_to_log_file(quiet()):
        ray.init(address=cfg.train.ray_address, configure_logging=False, log_to_driver=not quiet(),
                 runtime_env={"env_vars": _job_env(cfg.train)})  # fmt: skip


def _job_env(t: TrainConfig) -> dict[str, str]:
    """Env vars for every process of the driver's Ray job, Ray Train's controller included (whose teardown of
    a worker group with a dead worker otherwise waits ~2 x 2 s for Ray to confirm the death).

    Under `ray job submit` (or a KubeRay RayJob) Ray merges these into the submitted runtime env and
    refuses a key set in both, so a key the submission sets is left to it."""
    env = {"RAY_timeout_ms_task_wait_for_death_info": str(t.lost_actor_grace_ms)}
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = (submitted.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in taken}


def ray_ready() -> bool:
    import ray

    return bool(ray.is_initialized())


def train(cfg: RunConfig, manifest: DatasetManifest) -> TrainResult:
    """Start or resume run `cfg.train.run` on `manifest`'s dataset; returns its final committed checkpoint.

    Everything that can be refused is refused before Ray starts: another trainer holding the run's lease, a
    checkpoint of another architecture, TP degree or FSDP, an unreachable Ray address. SIGINT and SIGTERM stop
    it cleanly (TrainingInterrupted); MLflow's run ends FINISHED, FAILED or KILLED with it.
    """
    from opt.train.recipe import resolve

    t = cfg.train
    # a batch size the run's shape cannot reach fails here, before anything is written, not in every worker;
    # an elastic run must reach it with every worker count it may get
    recipes = [
        resolve(
            cfg.model.preset,
            manifest.seq_len,
            n // t.tensor_parallel,
            t.micro_batch_size,
            t.max_steps,
            t.lr,
            t.warmup_steps,
            t.batch_tokens,
        )  # fmt: skip
        for n in t.worker_counts
    ]
    recipe = recipes[-1]
    uri = run_uri(cfg)
    logbook = Logbook(uri)
    run_file = storage.join(uri, RUN_FILE)
    previous = json.loads(storage.read_text(run_file)) if storage.exists(run_file) else {}
    if previous.get("dataset_id") not in (None, manifest.dataset_id):
        raise TrainingError(
            f"run {cfg.train.run!r} was trained on dataset {previous['dataset_id']}, not {manifest.dataset_id}; "
            "choose a new run name (train.run=...) to train on the new data"
        )
    # one trainer per run: taken before anything of the run is written, renewed while it trains
    with stop_signals_raise() as signals, acquire(uri, "optctl train", t.lease_ttl_s) as lease:
        if lease.taken_over:
            logbook.append("lease_taken_over", previous_holder=describe(lease.taken_over), previous_command=lease.taken_over.get("command"))
        if signals:

            def lost(holder: str) -> None:  # a trainer that lost its lease stops as if interrupted
                logbook.append("lease_lost", holder=holder)
                os.kill(os.getpid(), signal.SIGTERM)

            lease.on_lost = lost
        existing = latest_committed(uri, on_skip=lambda bad, why: logbook.append("checkpoint_skipped", uri=bad, reason=why))
        if existing is not None:
            check_resume(cfg, cfg.model.build(manifest.vocab_size, manifest.seq_len), read_trainer_state(existing), existing.uri)
        try:
            return _train_leased(cfg, manifest, recipe, uri, logbook, previous, existing)
        except Interrupt as sig:
            newest = latest_committed(uri)
            where = f"newest committed checkpoint {newest.uri} (step {newest.step})" if newest else "no committed checkpoint yet"
            logbook.append("interrupted", signal=sig.name, step=newest.step if newest else 0, checkpoint=newest.uri if newest else None)
            raise TrainingInterrupted(f"training run {t.run!r} stopped by {sig.name}: {where}; the same command resumes it",
                                      sig.signum) from None  # fmt: skip


def _train_leased(cfg: RunConfig, manifest: DatasetManifest, recipe: Any, uri: str, logbook: Logbook, previous: dict,
                  existing: CommittedCheckpoint | None) -> TrainResult:  # fmt: skip
    """The rest of `train`, holding the run's lease, the checkpoint to resume (if any) already checked."""
    from opt.tracking import end_run, get_or_create_run

    t = cfg.train
    if not ray_ready():
        check_ray_address(t.ray_address, t.ray_connect_timeout_s)
    mlflow_run_id = get_or_create_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        cfg.tracking.artifact_root,
        cfg.train.run,
        previous.get("mlflow_run_id"),
        tags={"opt.run": cfg.train.run, "opt.dataset_id": manifest.dataset_id, "opt.preset": cfg.model.preset},
    )
    storage.write_text(
        storage.join(uri, RUN_FILE),
        json.dumps({"run": cfg.train.run, "dataset_id": manifest.dataset_id, "mlflow_run_id": mlflow_run_id}, indent=2),
    )
    _save_config(cfg, uri, logbook)
    _log_config(cfg, mlflow_run_id, manifest)
    if existing is not None and existing.step >= cfg.train.end_step:
        log.info("run %s already has a committed checkpoint at step %d; nothing to train", cfg.train.run, existing.step)
        end_run(cfg.tracking.uri, mlflow_run_id, "FINISHED")
        return TrainResult(uri, mlflow_run_id, existing, {})
    status = "FAILED"
    try:
        result = _train_from(cfg, manifest, recipe, uri, logbook, existing, mlflow_run_id)
        status = "FINISHED"
        return result
    except BaseException as e:
        status = "KILLED" if isinstance(e, (Interrupt, KeyboardInterrupt)) else "FAILED"
        raise
    finally:
        end_run(cfg.tracking.uri, mlflow_run_id, status)


def _train_from(cfg: RunConfig, manifest: DatasetManifest, recipe: Any, uri: str, logbook: Logbook,
                existing: CommittedCheckpoint | None, mlflow_run_id: str) -> TrainResult:  # fmt: skip
    from opt.train.optim import hparams  # imports torch: not at module level (opt.stages stays light)

    t = cfg.train
    if existing is not None:
        _record_changes(read_trainer_state(existing), hparams(t, recipe.lr), existing.step, logbook, mlflow_run_id, cfg)
    logbook.append(
        "run_started" if existing is None else "run_resumed",
        dataset_id=manifest.dataset_id,
        max_steps=cfg.train.max_steps,
        **({"stop_at_step": cfg.train.end_step} if cfg.train.end_step < cfg.train.max_steps else {}),
        workers=cfg.train.num_workers,
        from_step=existing.step if existing else 0,
        lr=recipe.lr,
        warmup_steps=recipe.warmup_steps,
        grad_accum=recipe.grad_accum,
        batch_tokens=recipe.batch_tokens,
    )

    scratch = work_dir(cfg)
    (scratch / "cache").mkdir(parents=True, exist_ok=True)
    payload = {
        "config": cfg.model_dump(mode="json"),
        "manifest": manifest.to_json(),
        "run_uri": uri,
        "mlflow_run_id": mlflow_run_id,
        "cache_dir": str(scratch / "cache"),
    }
    _ray_init(cfg)
    from opt.train.metrics_sink import close_sink, spill_path, start_sink

    # rank 0 of every attempt hands its metrics to this one actor (no MLflow client on the restart path)
    sink = start_sink(cfg.tracking.uri, mlflow_run_id, spill_path(scratch / "cache", mlflow_run_id))
    from opt.console import quiet
    from opt.train.progress import Progress

    # with Ray's worker output off the terminal, the driver says how far training is
    progress = Progress(sink, t.run, t.end_step).start() if quiet() else None
    try:
        result = _fit_with_restarts(cfg, {**payload, "metrics_sink": sink}, logbook)
    except TrainingError:
        _log_logbook(cfg, uri, mlflow_run_id, logbook)
        raise
    except Exception as e:  # Ray itself failed (not an attempt): one line for the user, the details in the logbook
        logbook.append("run_failed", error=f"{type(e).__name__}: {e}"[:2000])
        _log_logbook(cfg, uri, mlflow_run_id, logbook)
        raise TrainingError(f"training run {t.run!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        if progress is not None:
            progress.stop()
        if not close_sink(sink):
            log.warning("some metrics could not be sent to MLflow yet; the next run of %s sends them", t.run)
    final = latest_committed(uri)
    if final is None or final.step < t.end_step:
        gave_up = [e for e in logbook.read() if e["event"] == "spike_gave_up"]
        if gave_up and (final is None or gave_up[-1]["step"] > final.step):
            last = gave_up[-1]
            message = (
                f"training run {t.run!r} gave up at step {last['step']} after {last['rollbacks']} rollbacks: {last['reason']}; "
                f"the logbook (`optctl logbook show {t.run}`) lists every spike. Lower train.lr, raise "
                "train.spikes.max_rollbacks, or look at the data around the spikes' data steps"
            )
            logbook.append("run_failed", error=message)
            _log_logbook(cfg, uri, mlflow_run_id, logbook)
            raise TrainingError(message)
        logbook.append("run_failed", error="no final checkpoint")
        _log_logbook(cfg, uri, mlflow_run_id, logbook)
        raise TrainingError(f"training run {t.run!r} ended without a committed checkpoint at step {t.end_step}")
    metrics = dict(result.metrics or {})
    logbook.append("run_finished", step=final.step, checkpoint=final.uri, loss=metrics.get("loss"))
    _log_logbook(cfg, uri, mlflow_run_id, logbook)
    return TrainResult(uri, mlflow_run_id, final, metrics)


def _fit_with_restarts(cfg: RunConfig, payload: dict, logbook: Logbook) -> Any:
    """Run attempts until one finishes: each failure is logged with its rank, node and error, nodes that
    keep failing are kept out, and the run stops after `max_failures` attempts in a row without progress.

    Ray Train restarts the worker group in place (its FailureConfig retries forever) while our policy,
    a callback on its controller, logs every failure and decides: restart in place, restart with a new
    placement (a node is to be kept out: the controller stops and this driver starts a new trainer with
    the node excluded), or give up. An in-place restart skips a new controller's start-up (~5 s here).
    Every attempt resumes from the newest committed checkpoint.
    """
    from ray.train import ControllerError, TrainingFailedError
    from ray.train.torch import TorchConfig
    from ray.train.v2.api.config import FailureConfig  # the Train V2 classes ray.train exports (mypy sees V1 there)
    from ray.train.v2.api.config import RunConfig as RayRunConfig

    from opt.train.restarts import _after_failure, _committed_step, _GiveUp, _PolicyState, _Replace, _RestartPolicy

    t = cfg.train
    run_uri = payload["run_uri"]
    storage_path, filesystem = _ray_storage(cfg)
    driver_started = time.time()
    state = _PolicyState()
    os.environ.update(_controller_env(t))
    while True:
        state.before = _committed_step(run_uri)
        run_config: Any = RayRunConfig(
            name=t.run, storage_path=storage_path, storage_filesystem=filesystem,
            callbacks=[_RestartPolicy(t, run_uri, state)],
            # worker failures: retried in place for as long as the policy allows; a failure of the controller
            # itself (the policy's decision to stop or re-place, workers that cannot be scheduled) ends fit()
            failure_config=FailureConfig(max_failures=-1, controller_failure_limit=0),
        )  # fmt: skip
        trainer = _trainer_class()(
            train_worker_entry,
            train_loop_config={**payload, "attempt": state.attempt, "trainer_started": time.time()},
            scaling_config=_scaling(t, state.excluded),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo", timeout_s=t.collective_timeout_s),
            run_config=run_config,
        )
        try:
            try:
                result = trainer.fit()
            finally:
                raise_if_stopped()  # our abort on a stop signal ends fit() one way or another: say why
            return result
        except TrainingFailedError as e:
            cause = e.controller_failure if isinstance(e, ControllerError) else None
            if isinstance(cause, _GiveUp):
                raise TrainingError(str(cause)) from None
            if isinstance(cause, _Replace):  # the policy keeps a node out: a new placement
                state = cause.args[0]
            else:  # the controller failed otherwise (e.g. the workers could not be scheduled): one more failed attempt
                state = _PolicyState.from_logbook(logbook.read(), since=driver_started, current=state)
                try:
                    _after_failure(e, getattr(e, "worker_failures", None) or {}, t, run_uri, logbook, state)
                except _GiveUp as stop:
                    raise TrainingError(str(stop)) from None
        logbook.append("restart", attempt=state.attempt, failures_in_a_row=state.in_a_row, excluded_nodes=state.excluded, in_place=False)


def _controller_env(t: TrainConfig) -> dict[str, str]:
    """Ray Train settings read from the driver's environment by TorchTrainer, which passes them on to the
    controller it starts (Ray Train's ENV_VARS_TO_PROPAGATE)."""
    return {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(t.health_check_interval_s),
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1" if t.preemption_watcher else "0",
    }


def _trainer_class() -> Any:
    """Ray Train's TorchTrainer without its Ray Data hook.

    The trainer reads its own token shards, but Ray Train's DatasetsCallback starts a DatasetManager actor
    for every attempt, datasets or not: one more Python process (imports of ray.data and pandas, ~2.3
    CPU-seconds on the head node) on every restart's path. `_create_default_callbacks` is Ray Train V2's
    own (ray 2.60, pinned); tests/unit/train/test_job.py checks the rest of the list is untouched."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2.torch.torch_trainer import TorchTrainer  # what ray.train.torch exports (mypy sees V1 there)

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, DatasetsCallback)]

        def _register_sigint_handler(self, controller: Any) -> None:
            # Ray's own aborts the run and exits 0 from inside the handler; ours aborts it, then raises Interrupt
            abort_then_raise(controller)

    return Trainer


def _scaling(t: TrainConfig, excluded: list[str]) -> Any:
    from ray.train.v2.api.config import ScalingConfig  # the Train V2 class ray.train exports (mypy sees V1 there)

    resources = {"CPU": t.cpus_per_worker, **t.resources_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    return ScalingConfig(
        num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker=resources,
        label_selector={"ray.io/node-id": f"!in({','.join(excluded)})"} if excluded else None,
    )


def _ray_storage(cfg: RunConfig) -> tuple[str, Any]:
    """Ray Train's run storage inside the store: a local path, or S3 (through the configured endpoint)."""
    uri = storage.join(cfg.storage.root, "ray")
    if not storage.is_s3(uri):
        return uri, None
    import pyarrow.fs

    endpoint = cfg.storage.s3_endpoint_url or os.environ.get("OPT_S3_ENDPOINT_URL")
    return uri.removeprefix("s3://"), pyarrow.fs.S3FileSystem(endpoint_override=endpoint) if endpoint else pyarrow.fs.S3FileSystem()


def _log_logbook(cfg: RunConfig, uri: str, mlflow_run_id: str, logbook: Logbook) -> None:
    """The rendered logbook goes to MLflow with the run (and stays in the store as logbook.jsonl)."""
    from opt.logbook import render_markdown
    from opt.tracking import client

    try:
        client(cfg.tracking.uri).log_text(mlflow_run_id, render_markdown(cfg.train.run, logbook.read()), "logbook.md")
    except Exception as e:  # tracking never blocks training
        log.warning("could not send the logbook to MLflow: %s", e)


def train_worker_entry(payload: dict) -> None:
    # imported inside the worker so the driver does not pay for it
    from opt.train.loop import train_worker

    train_worker(payload)


def _record_changes(saved: dict, now: dict, step: int, logbook: Logbook, mlflow_run_id: str, cfg: RunConfig) -> None:
    """A resume with another optimizer, LR, clipping or betas: say so in the logbook and in MLflow."""
    from opt.tracking import client
    from opt.train.optim import changes

    diff = changes(saved.get("hparams", {"optimizer": "adamw"}), now)
    if not diff:
        return
    if "optimizer" in diff:
        old, new = diff["optimizer"]
        restored = new in saved.get("dormant_optimizers", [])
        logbook.append("optimizer_switched", step=step, previous=old, optimizer=new, state="restored" if restored else "new")
    logbook.append("hparams_changed", step=step, changes=diff)
    try:
        client(cfg.tracking.uri).set_tag(mlflow_run_id, f"opt.changes.step-{step}", json.dumps(diff, sort_keys=True))
    except Exception as e:  # tracking never blocks training
        log.warning("could not record the changed settings in MLflow: %s", e)


def _save_config(cfg: RunConfig, uri: str, logbook: Logbook) -> None:
    """`config.yaml` is the resolved config of the latest attempt; earlier, different ones are kept beside it."""
    import difflib
    import time

    path = storage.join(uri, "config.yaml")
    new = cfg.to_yaml()
    if storage.exists(path) and (old := storage.read_text(path)) != new:
        kept = storage.join(uri, f"config-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.yaml")
        storage.write_text(kept, old)
        changes = [line for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]  # fmt: skip
        logbook.append("config_changed", previous=kept, changes=changes[:50])
    storage.write_text(path, new)


def _log_config(cfg: RunConfig, mlflow_run_id: str, manifest: DatasetManifest) -> None:
    """The resolved config and the data lineage (dataset and raw inputs as MLflow inputs) go to the run."""
    from opt.tracking import client, log_dataset_inputs

    try:
        client(cfg.tracking.uri).log_text(mlflow_run_id, cfg.to_yaml(), "config.yaml")
        log_dataset_inputs(cfg.tracking.uri, mlflow_run_id, manifest)
    except Exception as e:  # tracking never blocks training
        log.warning("could not log the resolved config and dataset to MLflow: %s", e)
