"""The training driver: launches Ray Train's TorchTrainer over `train_worker` and records the run."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opt import storage
from opt.config import RunConfig, TrainConfig
from opt.data.manifest import DatasetManifest
from opt.errors import OptError
from opt.logbook import Logbook
from opt.train.checkpoint import CommittedCheckpoint, latest_committed, read_trainer_state

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
    # A local instance by default; a cluster by address. Quiet logs: the trainer prints its own progress.
    ray.init(address=cfg.train.ray_address, configure_logging=False)


def train(cfg: RunConfig, manifest: DatasetManifest) -> TrainResult:
    """Start or resume run `cfg.train.run` on `manifest`'s dataset; returns its final committed checkpoint."""
    from opt.tracking import get_or_create_run
    from opt.train.optim import hparams  # imports torch: not at module level (opt.stages stays light)
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
    mlflow_run_id = get_or_create_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        cfg.tracking.artifact_root,
        cfg.train.run,
        previous.get("mlflow_run_id"),
        tags={"opt.run": cfg.train.run, "opt.dataset_id": manifest.dataset_id, "opt.preset": cfg.model.preset},
    )
    storage.write_text(
        run_file, json.dumps({"run": cfg.train.run, "dataset_id": manifest.dataset_id, "mlflow_run_id": mlflow_run_id}, indent=2)
    )
    _save_config(cfg, uri, logbook)
    _log_config(cfg, mlflow_run_id)
    existing = latest_committed(uri, on_skip=lambda bad, why: logbook.append("checkpoint_skipped", uri=bad, reason=why))
    if existing is not None and existing.step >= cfg.train.max_steps:
        log.info("run %s already has a committed checkpoint at step %d; nothing to train", cfg.train.run, existing.step)
        return TrainResult(uri, mlflow_run_id, existing, {})
    if existing is not None and (saved_tp := read_trainer_state(existing).get("tensor_parallel", 1)) != t.tensor_parallel:
        raise TrainingError(
            f"run {t.run!r} was trained with train.tensor_parallel={saved_tp}; resume it with the same value "
            "(train.num_workers may change), or start a new run"
        )
    if existing is not None:
        _record_changes(read_trainer_state(existing), hparams(t, recipe.lr), existing.step, logbook, mlflow_run_id, cfg)
    logbook.append(
        "run_started" if existing is None else "run_resumed",
        dataset_id=manifest.dataset_id,
        max_steps=cfg.train.max_steps,
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
    try:
        result = _fit_with_restarts(cfg, payload, logbook)
    except TrainingError:
        _log_logbook(cfg, uri, mlflow_run_id, logbook)
        raise
    except Exception as e:  # Ray itself failed (not an attempt): one line for the user, the details in the logbook
        logbook.append("run_failed", error=f"{type(e).__name__}: {e}"[:2000])
        _log_logbook(cfg, uri, mlflow_run_id, logbook)
        raise TrainingError(f"training run {t.run!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    final = latest_committed(uri)
    if final is None or final.step < t.max_steps:
        gave_up = [e for e in logbook.read() if e["event"] == "spike_gave_up"]
        if gave_up and (final is None or gave_up[-1]["step"] > final.step):
            last = gave_up[-1]
            message = (
                f"training run {t.run!r} gave up at step {last['step']} after {last['rollbacks']} rollbacks: {last['reason']}; "
                f"the logbook ({storage.join(uri, 'logbook.jsonl')}) lists every spike. Lower train.lr, raise "
                "train.spikes.max_rollbacks, or look at the data around the spikes' data steps"
            )
            logbook.append("run_failed", error=message)
            _log_logbook(cfg, uri, mlflow_run_id, logbook)
            raise TrainingError(message)
        logbook.append("run_failed", error="no final checkpoint")
        _log_logbook(cfg, uri, mlflow_run_id, logbook)
        raise TrainingError(f"training run {t.run!r} ended without a committed checkpoint at step {t.max_steps}")
    metrics = dict(result.metrics or {})
    logbook.append("run_finished", step=final.step, checkpoint=final.uri, loss=metrics.get("loss"))
    _log_logbook(cfg, uri, mlflow_run_id, logbook)
    return TrainResult(uri, mlflow_run_id, final, metrics)


def _fit_with_restarts(cfg: RunConfig, payload: dict, logbook: Logbook) -> Any:
    """Run attempts until one finishes: each failure is logged with its rank, node and error, nodes that
    keep failing are kept out, and the run stops after `max_failures` attempts in a row without progress.

    Restarts are ours, not Ray Train's (its FailureConfig is 0), so each new attempt can change placement
    and the logbook sees every failure. Every attempt resumes from the newest committed checkpoint.
    """
    from ray.train import FailureConfig, TrainingFailedError
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    run_uri = payload["run_uri"]
    storage_path, filesystem = _ray_storage(cfg)
    excluded: list[str] = []
    node_failures: Counter[str] = Counter()
    in_a_row = 0
    # read by the driver's TorchTrainer, which passes it on to the controller it starts
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(t.health_check_interval_s)
    for attempt in itertools.count(1):
        before = _committed_step(run_uri)
        trainer = TorchTrainer(
            train_worker_entry,
            train_loop_config={**payload, "attempt": attempt},
            scaling_config=_scaling(t, excluded),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo", timeout_s=t.collective_timeout_s),
            run_config=RayRunConfig(
                name=t.run, storage_path=storage_path, storage_filesystem=filesystem, failure_config=FailureConfig(max_failures=0)
            ),
        )
        try:
            return trainer.fit()
        except TrainingFailedError as e:
            failed_at = time.time()
            last_error, lost_nodes = _record_failure(e, attempt, logbook, node_failures)
            in_a_row = 0 if _committed_step(run_uri) > before else in_a_row + 1
            if in_a_row > t.max_failures:
                message = (
                    f"training run {t.run!r} stopped: {in_a_row} failed attempts in a row without a new checkpoint "
                    f"(train.max_failures={t.max_failures}); last error: {last_error}. The logbook "
                    f"({logbook.uri}) lists every failure"
                )
                logbook.append("run_failed", error=message)
                raise TrainingError(message) from None
            for node, count in node_failures.items():
                if count >= t.exclude_node_after and node not in excluded:
                    if _has_room(t, [*excluded, node, *lost_nodes]):
                        excluded.append(node)
                        logbook.append("node_excluded", node=node, failures=count)
                    else:
                        logbook.append("node_kept", node=node, failures=count, reason="the other nodes have no room for the workers")
            logbook.append("restart", attempt=attempt + 1, failures_in_a_row=in_a_row, excluded_nodes=excluded,
                           decided_in_s=round(time.time() - failed_at, 3))  # fmt: skip
            log.warning("attempt %d of run %s failed (%s); restarting", attempt, t.run, last_error)
    raise AssertionError("unreachable")


def _record_failure(e: Exception, attempt: int, logbook: Logbook, node_failures: Counter[str]) -> tuple[str, set[str]]:
    """One `failure` entry per failed rank (with its node and host, as the attempt's workers reported them).

    A node is blamed (counted towards exclusion) when its worker died or raised an error of its own; a rank
    that only saw its peer go away (connection closed or reset, a collective timing out) blames nobody, or
    the survivors' nodes of every node kill would add up to their own exclusion. Returns the one-line error
    and the nodes whose workers were lost (Ray may still list such a node as alive for a few seconds).
    """
    started = [ev for ev in logbook.read() if ev["event"] == "workers_started" and ev.get("attempt") == attempt]
    workers: dict[str, dict[str, str]] = started[-1]["workers"] if started else {}
    per_rank: dict[int, BaseException] = getattr(e, "worker_failures", None) or {}
    if not per_rank:
        logbook.append("failure", attempt=attempt, error=_one_line(e))
        return _one_line(e), set()
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    lost_nodes: set[str] = set()
    lost_ranks: set[int] = set()
    for rank, exc in sorted(per_rank.items()):
        where = workers.get(str(rank), {})
        node = where.get("node")
        # the worker process is unreachable (its node or the process died), not a Python error in a live worker;
        # node_lost: Ray already knows the node is dead (its health checks take a few seconds to say so)
        lost = type(exc).__name__ in _LOST_WORKER_ERRORS
        node_lost = bool(node) and node not in alive
        blamed = lost or node_lost or not _PEER_ERROR.search(str(exc))
        logbook.append("failure", attempt=attempt, rank=rank, node=node, host=where.get("host"), worker_lost=lost or node_lost,
                       node_lost=node_lost, blamed=blamed, error=_one_line(exc))  # fmt: skip
        if node and blamed:
            node_failures[node] += 1
        if node and (lost or node_lost):
            lost_nodes.add(node)
        if lost or node_lost:
            lost_ranks.add(rank)
    if not lost_ranks:
        # only survivors' errors: Ray Train saw a rank lose its peer before the dead peer missed a health check
        _watch_for_lost_nodes(attempt, {int(r): w for r, w in workers.items()}, logbook, node_failures)
    culprit = next((x for r, x in sorted(per_rank.items()) if not _PEER_ERROR.search(str(x))), next(iter(per_rank.values())))
    return _one_line(culprit), lost_nodes


def _watch_for_lost_nodes(
    attempt: int, workers: dict[int, dict[str, str]], logbook: Logbook, node_failures: Counter[str], timeout_s: float = 60.0
) -> threading.Thread:
    """Record, once Ray declares it dead, a node of the failed attempt whose loss no rank reported.

    Runs in the background so the restart does not wait for Ray's node health checks (seconds); a hang
    with every node alive just times out.
    """
    import ray

    def watch() -> None:
        start, pending = time.time(), {r: w for r, w in workers.items() if w.get("node")}
        while pending and time.time() - start < timeout_s:
            try:
                dead = {n["NodeID"] for n in ray.nodes() if not n.get("Alive")}
            except Exception:  # Ray is shutting down (the run ended): nothing more to learn
                return
            for rank, w in sorted(pending.items()):
                if w["node"] in dead:
                    node_failures[w["node"]] += 1
                    logbook.append("failure", attempt=attempt, rank=rank, node=w["node"], host=w.get("host"), worker_lost=True,
                                   node_lost=True, blamed=True, seen_after_s=round(time.time() - start, 1),
                                   error="NodeDiedError: Ray declared the node dead after the attempt failed")  # fmt: skip
                    del pending[rank]
            time.sleep(0.5)

    thread = threading.Thread(target=watch, name=f"watch-lost-nodes-{attempt}", daemon=True)
    thread.start()
    return thread


# what a rank sees when a peer dies or stops answering (gloo, NCCL, torch's store): its own node is not at fault
_PEER_ERROR = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|Timed out waiting|timed out after|Socket Timeout|"
    r"NCCL communicator was aborted|ncclRemoteError|remote process exited|DistNetworkError",
    re.IGNORECASE,
)
_LOST_WORKER_ERRORS = ("WorkerHealthCheckFailedError", "ActorDiedError", "ActorUnavailableError", "NodeDiedError")


def _one_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # Ray wraps the worker's traceback: its last line is the exception itself
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]


def _committed_step(run_uri: str) -> int:
    ckpt = latest_committed(run_uri)
    return ckpt.step if ckpt else 0


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


def _has_room(t: TrainConfig, excluded: list[str]) -> bool:
    """Whether the alive nodes outside `excluded` can hold the smallest worker group the run accepts."""
    import ray

    need = {"CPU": t.cpus_per_worker, **t.resources_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    slots = 0
    for node in ray.nodes():
        if node.get("Alive") and node["NodeID"] not in excluded:
            have = node.get("Resources", {})
            slots += int(min(have.get(k, 0) // v for k, v in need.items() if v > 0))
    return slots >= (t.min_workers or t.num_workers)


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


def _log_config(cfg: RunConfig, mlflow_run_id: str) -> None:
    from opt.tracking import client

    try:
        client(cfg.tracking.uri).log_text(mlflow_run_id, cfg.to_yaml(), "config.yaml")
    except Exception as e:  # tracking never blocks training
        log.warning("could not log the resolved config to MLflow: %s", e)
