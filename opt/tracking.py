"""MLflow tracking: the run record shared by training, evaluation and registration, and a metrics buffer.

MLflow is imported lazily. The buffer keeps every point until MLflow accepted it, so a tracking
server that is briefly unreachable costs no data and never stops training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Point = tuple[str, float, int, int]  # one metric point: (key, value, timestamp in ms, step)


def prepare_tracking_uri(uri: str) -> str:
    """Create the directory of a SQLite tracking database so a fresh checkout works."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=prepare_tracking_uri(tracking_uri))


def get_or_create_experiment(tracking_uri: str, experiment: str, artifact_root: str) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    from opt.storage import is_uri

    location = artifact_root if is_uri(artifact_root) else Path(artifact_root).resolve().as_uri()
    return c.create_experiment(experiment, artifact_location=f"{location.rstrip('/')}/{experiment}")


def get_or_create_run(
    tracking_uri: str, experiment: str, artifact_root: str, run_name: str, existing_run_id: str | None, tags: dict[str, str]
) -> str:
    """The MLflow run id for a training run: reuse `existing_run_id` when it still exists, else create one."""
    c = client(tracking_uri)
    if existing_run_id:
        try:
            c.get_run(existing_run_id)
            return existing_run_id
        except Exception:
            log.warning("MLflow run %s not found at %s; starting a new one", existing_run_id, tracking_uri)
    exp_id = get_or_create_experiment(tracking_uri, experiment, artifact_root)
    return c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


class MetricsBuffer:
    """Metrics for one MLflow run, sent in batches by a background thread.

    `log` only appends under a lock, so a slow or unreachable tracking server never slows the
    training step. Failed sends keep every point and retry with backoff. `close` waits a bounded time
    for delivery; what still could not be sent is spilled to `spill_path` (the run directory) and
    replayed by the next buffer for the same run, so no point is lost once the server returns.
    """

    BATCH = 1000  # MLflow's limit per log_batch

    def __init__(
        self, tracking_uri: str, run_id: str, spill_path: Path | None = None, interval_s: float = 2.0, client_factory: Any = None
    ) -> None:
        import threading

        self.tracking_uri, self.run_id, self.spill_path, self.interval_s = tracking_uri, run_id, spill_path, interval_s
        self._client_factory = client_factory or (lambda: client(tracking_uri))
        self._client: Any = None
        self._pending: list[Point] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.failures = 0
        if spill_path is not None and spill_path.is_file():  # points a previous attempt could not deliver
            import json

            self._pending += [tuple(p) for p in json.loads(spill_path.read_text())]  # type: ignore[misc]
            spill_path.unlink()
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.extend([(k, float(v), ts, step) for k, v in metrics.items()])

    def extend(self, points: list[Point]) -> None:
        """Queue points made elsewhere (e.g. by rank 0 for the run's metrics sink)."""
        with self._lock:
            self._pending += points

    def send_soon(self) -> None:
        """Wake the sender now instead of at its next interval; does not wait."""
        self._wake.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _send(self) -> bool:
        """One delivery attempt of everything pending; True when nothing is left."""
        from mlflow.entities import Metric

        with self._lock:
            batch = list(self._pending)
        if not batch:
            return True
        try:
            if self._client is None:
                self._client = self._client_factory()
            for i in range(0, len(batch), self.BATCH):
                chunk = batch[i : i + self.BATCH]
                self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in chunk])
                with self._lock:  # drop only what was delivered; points logged meanwhile stay queued
                    del self._pending[: len(chunk)]
        except Exception as e:  # tracking must never stop training
            self.failures += 1
            log.warning("MLflow unreachable (%s); keeping %d points for the next try", str(e).splitlines()[0][:200], self.pending)
            return False
        return True

    def _run(self) -> None:
        delay = self.interval_s
        while not self._stop:
            self._wake.wait(delay)
            self._wake.clear()
            delay = self.interval_s if self._send() else min(60.0, delay * 2)  # back off while it is down

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Try to deliver everything now (from the caller's thread), for at most about `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self._send():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return True

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop the sender after a last bounded delivery; spill what is left. True if everything arrived."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        delivered = self.flush(timeout_s)
        if not delivered and self.spill_path is not None:
            import json

            with self._lock:
                self.spill_path.parent.mkdir(parents=True, exist_ok=True)
                self.spill_path.write_text(json.dumps(self._pending))
            log.warning("%d metric points kept in %s until MLflow is reachable", self.pending, self.spill_path)
        return delivered
