"""The session's one real `prefect server start` on loopback, and a real process worker against it.

Prefect's `prefect_test_harness` runs no scheduler, so schedules, workers and concurrency limits are tested
here, against the server Prefect ships, with its loops shortened (scheduler every 2 s, worker polls every 1 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

FAST_LOOPS = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the process group, SIGKILL after the grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def start_server(home: Path, port: int) -> tuple[subprocess.Popen, str]:
    import httpx

    # the UI asks the API at PREFECT_UI_API_URL, which otherwise names the default port
    env = {**os.environ, **FAST_LOOPS, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 (kept open for the server's life)
    proc = subprocess.Popen([_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    api, deadline = f"http://127.0.0.1:{port}/api", time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


@contextmanager
def worker(api: str, pool: str, log_path: Path, env: dict[str, str] | None = None) -> Any:
    """A real `prefect worker start --pool POOL --type process` for the block's duration."""
    full = {**os.environ, **FAST_LOOPS, **(env or {}), "PREFECT_API_URL": api}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process"], stdout=log,
                                stderr=subprocess.STDOUT, env=full, start_new_session=True)  # fmt: skip
        try:
            yield proc
        finally:
            # After it has run flows, the worker forwards SIGTERM as SIGINT to itself and then waits on its runner for
            # the full grace period (seen: 20 s, every time); nothing is left to finish, so 3 s are enough.
            stop(proc, grace_s=3.0)


def wait_for_state(flow_run_id: Any, types: set[str], timeout_s: float = 300.0) -> Any:
    """The flow run once its state type is one of `types` (e.g. {"COMPLETED", "FAILED"}); fails the test on timeout."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.type.value in types:
                return run
            if time.monotonic() > deadline:
                pytest.fail(f"flow run {run.name} still {run.state.name if run.state else None} after {timeout_s:.0f} s, wanted {types}")
            time.sleep(1.0)
