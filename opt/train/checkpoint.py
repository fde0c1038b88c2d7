"""Sharded training checkpoints with `torch.distributed.checkpoint`, committed by a marker written last.

Layout: `<run>/step-<N>/` holds DCP's `.metadata` and per-rank `__<rank>_*.distcp` files plus
`trainer.json`; `COMMIT.json` (size and sha256 of every file) is written last by rank 0, after all
ranks finished. A directory without a valid commit marker is never loaded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opt import storage

log = logging.getLogger(__name__)

COMMIT_FILE = "COMMIT.json"
TRAINER_FILE = "trainer.json"
_STEP_DIR = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class CommittedCheckpoint:
    step: int
    uri: str
    files: dict[str, dict[str, Any]]


def step_uri(run_uri: str, step: int) -> str:
    return storage.join(run_uri, f"step-{step}")


def committed_steps(run_uri: str) -> list[int]:
    """Steps of the run with a commit marker, newest first (not yet verified: `verify` does that)."""
    return _committed_steps(run_uri)


def _committed_steps(run_uri: str) -> list[int]:
    steps = set()
    for f in storage.list_files(run_uri):
        parts = f.rstrip("/").split("/")
        m = _STEP_DIR.match(parts[-2]) if len(parts) >= 2 else None
        if m and parts[-1] == COMMIT_FILE:
            steps.add(int(m.group(1)))
    return sorted(steps, reverse=True)


def verify(ckpt_uri: str) -> CommittedCheckpoint:
    """Check every file listed in the commit marker; raises ValueError naming the first mismatch."""
    commit = json.loads(storage.read_text(storage.join(ckpt_uri, COMMIT_FILE)))
    for name, meta in commit["files"].items():
        info = storage.stat(storage.join(ckpt_uri, name))
        if info.size != meta["size"] or info.sha256 != meta["sha256"]:
            raise ValueError(f"{ckpt_uri}/{name}: size or sha256 differs from the commit marker")
    return CommittedCheckpoint(commit["step"], ckpt_uri, commit["files"])


def latest_committed(run_uri: str, on_skip: Any = None) -> CommittedCheckpoint | None:
    """The newest checkpoint whose commit marker verifies; corrupted ones are skipped (and reported)."""
    for step in _committed_steps(run_uri):
        uri = step_uri(run_uri, step)
        try:
            return verify(uri)
        except (ValueError, OSError, KeyError) as e:
            log.warning("skipping checkpoint %s: %s", uri, e)
            if on_skip is not None:
                on_skip(uri, str(e))
    return None


def local_copy(ckpt: CommittedCheckpoint, cache_dir: str | Path) -> Path:
    """A local directory with the checkpoint's files (the directory itself when the store is local)."""
    if not storage.is_s3(ckpt.uri):
        return Path(ckpt.uri)
    dst = Path(cache_dir) / ckpt.uri.removeprefix("s3://")
    for name in ckpt.files:
        if not (dst / name).exists():
            storage.get_file(storage.join(ckpt.uri, name), dst / name)
    return dst


@dataclass
class PendingSave:
    """A checkpoint whose shards are being written; `finish_save` commits it."""

    uri: str
    step: int
    trainer_state: dict[str, Any]
    target: Path
    local: bool
    started: float
    files: Future[dict[str, dict[str, Any]]]

    def done(self) -> bool:
        return self.files.done()


def _write_shards(
    dcp_future: Future[Any] | None, state: dict[str, Any] | None, target: Path, uri: str, rank: int, local: bool
) -> dict[str, dict[str, Any]]:
    """This rank's part of a save: DCP's write (unless already under way), then upload and hash its files."""
    import torch.distributed.checkpoint as dcp

    if dcp_future is not None:
        dcp_future.result()
    else:
        dcp.save(state, checkpoint_id=str(target))
    mine = [p for p in target.iterdir() if p.name.startswith(f"__{rank}_") or (rank == 0 and p.name == ".metadata")]
    files = {}
    for p in mine:
        info = storage.put_file(p, storage.join(uri, p.name)) if not local else storage.stat(str(p))
        files[p.name] = {"size": info.size, "sha256": info.sha256}
    return files


def begin_save(
    state: dict[str, Any],
    trainer_state: dict[str, Any],
    run_uri: str,
    step: int,
    rank: int,
    staging_root: str | Path,
    background_group: Any = None,
) -> PendingSave:
    """Collective: start writing a checkpoint. With `background_group` (a process group kept for
    checkpoints) the shards are copied to host memory and written by a thread while training goes on;
    without it this returns once this rank's shards are written."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    uri = step_uri(run_uri, step)
    local = not storage.is_s3(uri)
    if rank == 0 and storage.exists(uri):
        storage.delete(uri)  # leftovers of an uncommitted attempt at this step
    dist.barrier()
    t0 = time.perf_counter()
    target = Path(uri) if local else Path(tempfile.mkdtemp(prefix=f"step-{step}-", dir=staging_root))
    files: Future[dict[str, dict[str, Any]]]
    if background_group is None:
        files = Future()
        files.set_result(_write_shards(None, state, target, uri, rank, local))
    else:
        # async_save stages a copy of the state in host memory before it returns: training may go on
        dcp_future = dcp.async_save(state, checkpoint_id=str(target), process_group=background_group)
        files = _BACKGROUND.submit(_write_shards, dcp_future, None, target, uri, rank, local)  # type: ignore[arg-type]
    return PendingSave(uri, step, trainer_state, target, local, t0, files)


_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opt-checkpoint")


def all_ranks_done(pending: PendingSave, device: str = "cpu") -> bool:
    """Collective: whether every rank has finished writing its shards (a cheap check to run each step)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if pending.done() else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def finish_save(pending: PendingSave, rank: int) -> str:
    """Collective: wait for this rank's shards, then rank 0 writes trainer.json and the commit marker last."""
    import torch.distributed as dist

    files = pending.files.result()
    gathered: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, files)
    if rank == 0:
        all_files = {k: v for part in gathered for k, v in part.items()}
        info = storage.write_text(storage.join(pending.uri, TRAINER_FILE), json.dumps(pending.trainer_state, sort_keys=True))
        all_files[TRAINER_FILE] = {"size": info.size, "sha256": info.sha256}
        seconds = round(time.perf_counter() - pending.started, 3)
        commit = {"step": pending.step, "world_size": dist.get_world_size(), "files": all_files, "seconds": seconds}
        storage.write_text(storage.join(pending.uri, COMMIT_FILE), json.dumps(commit, indent=2, sort_keys=True))
    dist.barrier()
    if not pending.local:
        shutil.rmtree(pending.target, ignore_errors=True)
    return pending.uri


def save_sharded(state: dict[str, Any], trainer_state: dict[str, Any], run_uri: str, step: int, rank: int, staging_root: str | Path) -> str:
    """Collective: every rank writes its shards, then rank 0 writes trainer.json and the commit marker."""
    return finish_save(begin_save(state, trainer_state, run_uri, step, rank, staging_root), rank)


def prune(run_uri: str, keep_last: int | None, keep_every: int | None = None) -> list[int]:
    """Delete committed checkpoints beyond the newest `keep_last` (multiples of `keep_every` stay); returns
    the deleted steps. The commit marker goes first, so a half-deleted checkpoint is never loaded."""
    if keep_last is None:
        return []
    deleted = []
    for step in _committed_steps(run_uri)[keep_last:]:
        if keep_every and step % keep_every == 0:
            continue
        uri = step_uri(run_uri, step)
        storage.delete(storage.join(uri, COMMIT_FILE))
        storage.delete(uri)
        deleted.append(step)
    return deleted


def read_trainer_state(ckpt: CommittedCheckpoint) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(ckpt.uri, TRAINER_FILE)))
