"""The restart policy of a training run: log each failed attempt per rank, blame nodes, keep failing
nodes out, and give up when attempts stop making progress.

It runs as a callback on Ray Train's controller (`_RestartPolicy.after_exception`), so Ray Train restarts
the worker group in place when nothing needs to change, and in the driver for failures of the controller
itself. Imports Ray: only the driver's `_fit_with_restarts` and Ray's controller import this module.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.train.v2.api.callback import UserCallback  # what ray.train exports (mypy sees V1 there)

from opt.config import TrainConfig
from opt.logbook import Logbook
from opt.train.checkpoint import latest_committed

log = logging.getLogger("opt.train.job")


@dataclass
class _PolicyState:
    """What the restart policy carries from attempt to attempt (and from one Ray trainer to the next)."""

    attempt: int = 1
    in_a_row: int = 0
    before: int = 0
    """The newest committed step when the current attempt started."""
    node_failures: Counter[str] = field(default_factory=Counter)
    excluded: list[str] = field(default_factory=list)

    @classmethod
    def from_logbook(cls, entries: list[dict[str, Any]], since: float, current: _PolicyState) -> _PolicyState:
        """The state the controller's copy of the policy reached (it ran in another process), from the logbook."""
        ours = [e for e in entries if e.get("t", 0) >= since]
        restarts = [e for e in ours if e["event"] == "restart"]
        state = cls(attempt=current.attempt, in_a_row=current.in_a_row, before=current.before, excluded=list(current.excluded))
        if restarts:
            last = restarts[-1]
            state.attempt = max(current.attempt, last["attempt"])
            state.in_a_row, state.excluded = last.get("failures_in_a_row", 0), list(last.get("excluded_nodes", []))
        state.node_failures = Counter(e["node"] for e in ours if e["event"] == "failure" and e.get("blamed") and e.get("node"))
        return state


class _GiveUp(Exception):
    """Raised on Ray Train's controller: the run stops (the message says why)."""


class _Replace(Exception):
    """Raised on Ray Train's controller: restart with a new placement; args[0] is the policy's state."""


class _RestartPolicy(UserCallback):
    """On Ray Train's controller, after a failed attempt: log it, then restart in place (return), restart
    with a new placement (raise _Replace: a node is newly kept out), or stop (raise _GiveUp)."""

    def __init__(self, t: TrainConfig, run_uri: str, state: _PolicyState) -> None:
        self.t, self.run_uri, self.state = t, run_uri, state

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        logbook = Logbook(self.run_uri)
        failed_at = time.time()
        error = next(iter(worker_exceptions.values()), RuntimeError("unknown worker failure"))
        if _after_failure(error, worker_exceptions, self.t, self.run_uri, logbook, self.state):
            raise _Replace(self.state)
        s = self.state
        logbook.append("restart", attempt=s.attempt, failures_in_a_row=s.in_a_row, excluded_nodes=s.excluded, in_place=True,
                       decided_in_s=round(time.time() - failed_at, 3))  # fmt: skip


def _after_failure(e: BaseException, per_rank: Mapping[int, BaseException], t: TrainConfig, run_uri: str, logbook: Logbook,
                   state: _PolicyState) -> bool:  # fmt: skip
    """Log a failed attempt and decide. Returns whether a node was newly excluded; raises _GiveUp to stop."""
    failed_at = time.time()
    last_error, lost_nodes = _record_failure(e, per_rank, state.attempt, logbook, state.node_failures)
    committed = _committed_step(run_uri)
    state.in_a_row = 0 if committed > state.before else state.in_a_row + 1
    state.before = committed
    if state.in_a_row > t.max_failures:
        message = (
            f"training run {t.run!r} stopped: {state.in_a_row} failed attempts in a row without a new checkpoint "
            f"(train.max_failures={t.max_failures}); last error: {last_error}. The logbook ({logbook.uri}) lists every failure"
        )
        logbook.append("run_failed", error=message)
        raise _GiveUp(message)
    newly = False
    for node, count in list(state.node_failures.items()):
        if count >= t.exclude_node_after and node not in state.excluded:
            if _has_room(t, [*state.excluded, node, *lost_nodes]):
                state.excluded.append(node)
                newly = True
                logbook.append("node_excluded", node=node, failures=count)
            else:
                logbook.append("node_kept", node=node, failures=count, reason="the other nodes have no room for the workers")
    state.attempt += 1
    log.warning("attempt %d of run %s failed (%s); restarting (decided in %.2f s)", state.attempt - 1, t.run, last_error,
                time.time() - failed_at)  # fmt: skip
    return newly


def _record_failure(
    e: BaseException, per_rank: Mapping[int, BaseException], attempt: int, logbook: Logbook, node_failures: Counter[str]
) -> tuple[str, set[str]]:
    """One `failure` entry per failed rank (with its node and host, as the attempt's workers reported them).

    A node is blamed (counted towards exclusion) when its worker died or raised an error of its own; a rank
    that only saw its peer go away (connection closed or reset, a collective timing out) blames nobody, or
    the survivors' nodes of every node kill would add up to their own exclusion. Returns the one-line error
    and the nodes whose workers were lost (Ray may still list such a node as alive for a few seconds).
    """
    started = [ev for ev in logbook.read() if ev["event"] == "workers_started" and ev.get("attempt") == attempt]
    workers: dict[str, dict[str, str]] = started[-1]["workers"] if started else {}
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
