"""The session's one pipeline run and its one `mlflow server` (on PostgreSQL), shared by the integration tests.

The session pipeline and the trainings beside it write MLflow's PostgreSQL database directly (`tracking.uri` is the
database URL, as a single-host setup may); the scheduled pipeline of tests/integration/test_schedule.py reaches the
same database through the server over HTTP. Both are read back through the server in the UI and REST tests."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import SAMPLE

TRACKING_ENV = "OPT_TEST_TRACKING_URI"


def tracking_uri(root: Path) -> str:
    """The session's MLflow database once `mlflow_db` has run; SQLite under `root` before (no server needed)."""
    return os.environ.get(TRACKING_ENV) or f"sqlite:///{root / 'mlflow.db'}"


def overrides(root: Path, **extra: object) -> list[str]:
    base = {
        "storage.root": root / "store",
        "tracking.uri": tracking_uri(root),
        "tracking.artifact_root": root / "mlartifacts",
        "tracking.experiment": "it",
        "access.home": root / "access",
        "access.db_url": f"sqlite:///{root / 'access' / 'access.db'}",
        "access.release_root": root / "access" / "releases",
        "data.sources": json.dumps([{"name": "python-docs", "kind": "pile", "uri": str(SAMPLE)}]),
        "train.run": "it",
        "train.max_steps": 10,
        "train.checkpoint_every": 5,
        "train.warmup_steps": 2,
        "registry.model_name": "opt-it",
        "registry.access_class": "gated",
        "registry.gate.max_perplexity": 2000,
        "eval.max_batches": 20,
        "eval.limit": 20,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def prefect_harness():
    """The session's one ephemeral Prefect API (`prefect_test_harness`: no scheduler) for flows run in-process;
    schedules and workers are tested against a real `prefect server start` (tests/prefect_server.py)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mlflow_db(postgres_url):
    """A fresh `mlflow` database on the session's PostgreSQL, as the URL MLflow takes (tables made on first use)."""
    import psycopg

    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS mlflow")
        conn.execute("CREATE DATABASE mlflow")
    url = postgres_url.rsplit("/", 1)[0] + "/mlflow"
    os.environ[TRACKING_ENV] = url
    yield url
    os.environ.pop(TRACKING_ENV, None)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, ray_session, prefect_harness, mlflow_db):
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("pipeline")
    os.environ["OPT_HOME"] = str(root / "home")
    summary = pipeline(None, overrides(root))
    return root, summary


@contextmanager
def _mlflow_server(backend_store: str, artifacts: Path, log_path: Path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port for the block (its URL); SIGTERM to its group afterwards."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.conftest import _free_port

    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_store, "--serve-artifacts", "--artifacts-destination", str(artifacts)]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # its job runners too
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        try:
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server ({backend_store.split(':')[0]}) did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(mlflow_db, tmp_path_factory):
    """The session's one `mlflow server`, over the session's MLflow database; it proxies the artifacts of runs logged
    through it (those logged with a local artifact root, like the session pipeline's, it reads where they are)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with _mlflow_server(mlflow_db, root / "artifacts", root / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """The session's one real `prefect server start` (its own SQLite database), as its API URL. Module-scoped: only
    tests/integration/test_schedule.py uses it, and its services (looping every 2 s) stop with that module."""
    from tests.conftest import _free_port
    from tests.prefect_server import start_server, stop

    proc, api = start_server(tmp_path_factory.mktemp("prefect-server"), _free_port())
    try:
        yield api
    finally:
        stop(proc)
