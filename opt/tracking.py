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
    """Collects metrics and sends them in batches; failed sends keep the points for the next flush."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 10) -> None:
        self.tracking_uri, self.run_id, self.flush_every = tracking_uri, run_id, flush_every
        self.pending: list[Any] = []
        self._client: Any = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self.pending) >= self.flush_every * max(1, len(metrics)):
            self.flush()

    def flush(self) -> bool:
        if not self.pending:
            return True
        try:
            if self._client is None:
                self._client = client(self.tracking_uri)
            for i in range(0, len(self.pending), 1000):  # MLflow's batch limit
                self._client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        except Exception as e:  # tracking must never stop training
            log.warning("MLflow unreachable (%s); keeping %d points for the next flush", e, len(self.pending))
            return False
        self.pending.clear()
        return True
