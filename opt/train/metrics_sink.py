"""Training metrics on their way to MLflow through one Ray actor that outlives the attempts.

Rank 0 of every attempt used to open its own MLflow client: an import of mlflow and a tracking-store
connection (~1.5-2 CPU-seconds) inside the training process, right after each restart, where it slows
the first steps of every rank. Points it could not deliver were spilled on whichever node it ran, so a
rank 0 placed elsewhere by the next attempt never replayed them.

The sink is started once by the driver, on the head node (which reaches the tracking server and
outlives any worker node), and lives as long as the driver's job. Rank 0 only batches points and hands
them to the sink with fire-and-forget actor calls; a batch is kept until the sink has taken it. Should
the sink be lost, rank 0 falls back to its own `MetricsBuffer` with every point the sink had not taken
(points it had taken but not yet delivered go with it: on the head, that is with the cluster).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opt.tracking import MetricsBuffer, Point

log = logging.getLogger(__name__)


def spill_path(cache_dir: str | Path, run_id: str) -> Path:
    """Where points MLflow has not taken wait for the next run of the same MLflow run (a node-local cache)."""
    return Path(cache_dir) / "metrics-pending" / f"{run_id}.json"


class MetricsSink:
    """The actor: a `MetricsBuffer` (its own sender thread, retries, spill file) fed by rank 0."""

    def __init__(self, tracking_uri: str, run_id: str, spill_path: str | None) -> None:
        self.buffer = MetricsBuffer(tracking_uri, run_id, spill_path=Path(spill_path) if spill_path else None)
        self.latest: dict[str, Any] = {}

    def log(self, points: list[Point]) -> int:
        self.buffer.extend(points)
        for key, value, _, step in points:  # the newest step's figures, for the driver's progress line
            if step > self.latest.get("step", -1):
                self.latest = {"step": step}
            if step == self.latest["step"]:
                self.latest[key] = value
        return len(points)

    def progress(self) -> dict[str, Any]:
        """The newest step rank 0 handed over, with its metrics (loss, lr, tokens_per_s...)."""
        return dict(self.latest)

    def close(self, timeout_s: float) -> bool:
        """Deliver what is left (spilling what cannot be); True if MLflow has every point."""
        return self.buffer.close(timeout_s)


def start_sink(tracking_uri: str, run_id: str, spill_path: Path | None) -> Any:
    """Start the sink on the head node; it ends with the driver's Ray job.

    The head lives as long as the cluster (and runs the driver under `ray job submit`): a sink on a worker
    node would take the points it holds down with that node. Ray Train pins its own state actor the same way.
    """
    import ray

    actor: Any = ray.remote(num_cpus=0)(MetricsSink)
    return actor.options(resources={"node:__internal_head__": 0.001}).remote(tracking_uri, run_id, str(spill_path) if spill_path else None)


def close_sink(sink: Any, timeout_s: float = 30.0) -> bool:
    """Let the sink deliver (or spill) what it holds, then stop it. Never raises: tracking never fails a run."""
    import ray

    try:
        return bool(ray.get(sink.close.remote(timeout_s), timeout=timeout_s + 30))
    except Exception as e:
        log.warning("the metrics sink could not be closed cleanly (%s); points it held may be lost", e)
        return False
    finally:
        ray.kill(sink)


class SinkClient:
    """Rank 0's side, with `MetricsBuffer`'s interface (`log`, `send_soon`, `close`).

    `log` appends to a local batch and, at most every `interval_s`, submits it to the sink without
    waiting. Submitted batches are kept until their call has succeeded; a failed call (the sink is gone)
    switches to a local `MetricsBuffer` from `fallback`, which gets every point not yet taken, in order.
    """

    def __init__(self, sink: Any, fallback: Callable[[], MetricsBuffer], interval_s: float = 0.5) -> None:
        self._sink, self._fallback, self.interval_s = sink, fallback, interval_s
        self._batch: list[Point] = []
        self._in_flight: list[tuple[Any, list[Point]]] = []  # (ObjectRef of the call, its points)
        self._last_send = time.monotonic()
        self.local: MetricsBuffer | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        points = [(k, float(v), ts, step) for k, v in metrics.items()]
        if self.local is not None:
            self.local.extend(points)
            return
        self._batch += points
        if time.monotonic() - self._last_send >= self.interval_s:
            self.send_soon()

    def send_soon(self) -> None:
        """Submit the current batch now (e.g. at a checkpoint, so points up to it are out of this process)."""
        self.confirm(timeout_s=0)
        if self.local is None and self._batch:
            self._in_flight.append((self._sink.log.remote(self._batch), self._batch))
            self._batch = []
        self._last_send = time.monotonic()

    def confirm(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the sink to take the batches in flight (forgotten once taken); on a failed
        call (the sink is gone) fall back to a local buffer with every point not taken."""
        import ray

        if not self._in_flight:
            return
        refs = [ref for ref, _ in self._in_flight]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        finished = set(done)
        left: list[tuple[Any, list[Point]]] = []
        lost = None
        for ref, points in self._in_flight:
            if ref not in finished:
                left.append((ref, points))
                continue
            try:
                ray.get(ref)
            except Exception as e:  # the sink died: every point it has not confirmed stays with us
                lost = e
                left.append((ref, points))
        self._in_flight = left
        if lost is not None:
            log.warning("the metrics sink is gone (%s); rank 0 sends metrics to MLflow itself", str(lost).splitlines()[0][:200])
            self.local = self._fallback()
            self.local.extend([p for _, points in self._in_flight for p in points] + self._batch)
            self._in_flight, self._batch = [], []

    def close(self, timeout_s: float = 30.0) -> bool:
        """Hand over everything; True once the sink (or the local fallback's MLflow) has every point."""
        self.send_soon()
        self.confirm(timeout_s)
        if self.local is not None:
            return self.local.close(timeout_s)
        return not self._in_flight
