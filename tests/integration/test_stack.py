"""`optctl stack up` (`make serve`): every part answers at the URL it prints, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import _free_port
from tests.integration.conftest import overrides

pytestmark = pytest.mark.slow


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stack_up_starts_every_part_and_ctrl_c_stops_them_all(tmp_path):
    prefect, mlflow, access = _free_port(), _free_port(), _free_port()
    args = [a for kv in overrides(tmp_path, **{"access.url": f"http://127.0.0.1:{access}", "schedule.work_pool": "stack-pool"})
            for a in ("--set", kv)]  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "optctl"), "stack", "up", "--home", str(tmp_path / "stack"), "--prefect-port", str(prefect),
           "--mlflow-port", str(mlflow), *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("in another shell"):
                break
        out = "".join(lines)
        assert "the stack is up" in out, out
        for url in (f"http://127.0.0.1:{prefect}/api/health", f"http://127.0.0.1:{mlflow}/health", f"http://127.0.0.1:{access}/v1/health"):
            assert url.rsplit("/", 1)[0].removesuffix("/api").removesuffix("/v1") in out
            assert httpx.get(url, timeout=10).status_code == 200, url
        workers = httpx.post(f"http://127.0.0.1:{prefect}/api/work_pools/stack-pool/workers/filter", json={}, timeout=10).json()
        deadline = time.monotonic() + 60
        while not workers and time.monotonic() < deadline:  # the worker says hello on its first poll
            time.sleep(1)
            workers = httpx.post(f"http://127.0.0.1:{prefect}/api/work_pools/stack-pool/workers/filter", json={}, timeout=10).json()
        assert workers, "no worker polls the stack's work pool"
        deployments = httpx.post(f"http://127.0.0.1:{prefect}/api/deployments/filter", json={}, timeout=10).json()
        assert {d["name"] for d in deployments} >= {"pipeline-it", "access-housekeeping"}
        children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        groups = {int(os.getpgid(int(p))) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                                   text=True).stdout.split()}  # fmt: skip
        assert len(groups) == 4, groups  # Prefect server, MLflow server, access service, worker: each its own group
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "stack stopped" in rest
    assert not [g for g in groups if _group_alive(g)], "processes outlived the stack"
    assert not [p for p in children if Path(f"/proc/{p}").exists()]
