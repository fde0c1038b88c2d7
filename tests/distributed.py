"""Run a function on N real gloo ranks (fresh CPU processes from a forkserver) and collect what each rank returns."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 180.0) -> list[Any]:
    """`fn(*args)` on `world_size` ranks inside an initialised gloo process group; returns each rank's result.

    `fn` must be a module-level (picklable) function; `dist.get_rank()` tells it which rank it is. A failure on any
    rank fails the caller with that rank's traceback (torch's ProcessRaisedException) and stops the other ranks.
    """
    # forkserver: torch and the caller's module are imported once per session in the server, not once per rank
    # (a fresh spawn pays seconds of imports per rank, which dominates on a small machine)
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", fn.__module__])
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        ctx = mp.start_processes(_entry, args=(fn, world_size, tmp, args), nprocs=world_size, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout_s
        # join() returns False until every rank has exited, and raises (killing the others) on the first failure
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout_s:.0f} s")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, tmp: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # the ranks share this machine's few cores
    # a file store needs no free port; the timeout turns a collective mismatch into an error instead of a hang
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        result = fn(*args)
        torch.save(result, Path(tmp) / f"rank{rank}.pt")
        dist.barrier()  # nobody tears down its connections while another rank is still in a collective
    finally:
        dist.destroy_process_group()
