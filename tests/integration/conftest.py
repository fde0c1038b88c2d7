"""The session's one pipeline run and its one `mlflow server`, shared by the integration tests that read them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import SAMPLE


def overrides(root: Path, **extra: object) -> list[str]:
    base = {
        "storage.root": root / "store",
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
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
def pipeline_run(tmp_path_factory, ray_session):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("pipeline")
    os.environ["OPT_HOME"] = str(root / "home")
    with prefect_test_harness(server_startup_timeout=120):
        summary = pipeline(None, overrides(root))
    return root, summary


@pytest.fixture(scope="session")
def mlflow_server(pipeline_run):
    """The session's one `mlflow server`, over the pipeline's own tracking database and artifact store."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.conftest import _free_port

    root, _ = pipeline_run
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", str(root / "mlartifacts")]  # fmt: skip
    with open(root / "mlflow-server.log", "w") as log:
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
                    pytest.fail(f"mlflow server did not start: {(root / 'mlflow-server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


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


@pytest.fixture(scope="module")
def mlflow_pg_server(tmp_path_factory, postgres_url):
    """A real `mlflow server` whose backend store is PostgreSQL (Debian's server, the session's), as its URL."""
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import psycopg

    from tests.conftest import _free_port

    root = tmp_path_factory.mktemp("mlflow-pg")
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS mlflow")
        conn.execute("CREATE DATABASE mlflow")
    store = postgres_url.rsplit("/", 1)[0] + "/mlflow"
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", store, "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        try:
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server (PostgreSQL) did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
