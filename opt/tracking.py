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


# MLflow's UI opens an experiment of this kind on its model-training views (runs, metrics, models), not GenAI's traces
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def get_or_create_experiment(tracking_uri: str, experiment: str, artifact_root: str) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in exp.tags:  # made before we marked experiments; a kind set by hand stays
            c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    from opt.storage import is_uri

    location = artifact_root if is_uri(artifact_root) else Path(artifact_root).resolve().as_uri()
    return c.create_experiment(experiment, artifact_location=f"{location.rstrip('/')}/{experiment}", tags=dict([EXPERIMENT_KIND]))


def ui_links(base: str, tracking_uri: str, experiment: str, model: str, version: str) -> list[tuple[str, str]]:
    """Where a reviewer looks in MLflow's UI at `base`: the version page, and the experiment on its training views.

    MLflow 3.17's UI picks GenAI or model-training views by its own switch (kept in the browser), not by the
    experiment's kind tag, so the experiment link asks for the training views itself (`workflowType=machine_learning`).
    """
    exp = client(tracking_uri).get_experiment_by_name(experiment)
    from urllib.parse import quote

    links = [(f"{base}/#/models/{quote(model)}/versions/{version}?workflowType=machine_learning", "the card, gate tags and aliases")]
    if exp is not None:
        links.append(
            (f"{base}/#/experiments/{exp.experiment_id}?workflowType=machine_learning", "runs, charts; plots in a run's Artifacts")
        )
    return links


def log_dataset_inputs(tracking_uri: str, run_id: str, manifest: Any) -> None:
    """The run's data lineage as MLflow inputs: the prepared dataset (context `training`, its profile the per-source
    documents, duplicates removed and tokens) and each raw input file it was made from (context `source`).
    Logging the same inputs again (a resumed run) adds nothing: MLflow keys them by name and digest."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    def source(uri: str) -> tuple[str, str]:
        kind = "s3" if uri.startswith("s3://") else "local"
        return kind, json.dumps({"uri": uri if "://" in uri else Path(uri).resolve().as_uri()})

    profile: dict[str, Any] = {"train_tokens": manifest.train_tokens, "seq_len": manifest.seq_len, "vocab_size": manifest.vocab_size}
    for n, s in sorted(manifest.sources.items()):  # flat keys: MLflow's dataset drawer shows one line per key
        profile |= {f"{n}.documents_in": s.docs_in, f"{n}.exact_duplicates_removed": s.exact_duplicates,
                    f"{n}.near_duplicates_removed": s.near_duplicates, f"{n}.filtered_out": sum(s.dropped.values()),
                    f"{n}.train_tokens": s.train_tokens, f"{n}.valid_tokens": s.valid_tokens}  # fmt: skip
    inputs = [DatasetInput(Dataset(manifest.dataset_id, manifest.dataset_id, *source(manifest.uri), profile=json.dumps(profile)),
                           [InputTag(MLFLOW_DATASET_CONTEXT, "training")])]  # fmt: skip
    for i in manifest.inputs:
        name = f"{i.get('source', 'input')}:{Path(str(i['uri'])).name}"
        digest = str(i.get("sha256", ""))[:16] or manifest.dataset_id
        inputs.append(DatasetInput(Dataset(name, digest, *source(str(i["uri"])), profile=json.dumps({"bytes": i.get("size")})),
                                   [InputTag(MLFLOW_DATASET_CONTEXT, "source")]))  # fmt: skip
    client(tracking_uri).log_inputs(run_id, datasets=inputs)


def get_or_create_run(
    tracking_uri: str, experiment: str, artifact_root: str, run_name: str, existing_run_id: str | None, tags: dict[str, str]
) -> str:
    """The MLflow run id for a training run: reuse `existing_run_id` when it still exists, else create one."""
    c = client(tracking_uri)
    if existing_run_id:
        try:
            run = c.get_run(existing_run_id)
        except Exception:
            log.warning("MLflow run %s not found at %s; starting a new one", existing_run_id, tracking_uri)
        else:
            if run.info.status != "RUNNING":  # resumed: it runs again until it ends
                c.update_run(existing_run_id, status="RUNNING")
            return existing_run_id
    exp_id = get_or_create_experiment(tracking_uri, experiment, artifact_root)
    return c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark the MLflow run FINISHED, FAILED or KILLED (the UI shows it ended); a tracking outage only warns."""
    try:
        client(tracking_uri).set_terminated(run_id, status=status)
    except Exception as e:
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, str(e).splitlines()[0][:200])


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
