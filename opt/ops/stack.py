"""`optctl stack up` (`make serve`): the local stack on the embedded defaults, in the foreground.

A Prefect server (its own SQLite database under `<home>/prefect`), the deployments registered against it, a
process worker serving their pool, an MLflow tracking server over the config's tracking store, and the access
service. Each runs in its own process group with its log under `<home>/logs/`; Ctrl-C (or SIGTERM) stops them
all, newest first, SIGTERM then SIGKILL after a grace period, so no process outlives the stack. When one of
them exits on its own, the stack says which (with its log's last line) and stops the others.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from opt.errors import OptError

GRACE_S = 20.0


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    """Until no process of the group is left (members die a moment after their SIGKILL)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class Stack:
    def __init__(self, cfg: Any, config_path: str | None, overrides: list[str], home: Path, deploy: bool = True,
                 prefect_port: int = 4200, mlflow_port: int = 5000) -> None:  # fmt: skip
        self.cfg, self.config_path, self.overrides, self.deploy = cfg, config_path, overrides, deploy
        self.home = home.resolve()
        self.bin = Path(sys.executable).parent
        access = urlparse(cfg.access.url)
        self.ports = {"prefect": prefect_port, "mlflow": mlflow_port, "access": access.port or 8600}
        self.procs: list[_Proc] = []
        self.prefect_api = f"http://127.0.0.1:{prefect_port}/api"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"PREFECT_HOME": str(self.home / "prefect"), "PREFECT_API_URL": self.prefect_api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_API_URL": self.prefect_api})  # fmt: skip
        return env

    def _start(self, name: str, cmd: list[str]) -> None:
        log = self.home / "logs" / f"{name}.log"
        with open(log, "ab") as f:
            popen = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env(), start_new_session=True
            )
        self.procs.append(_Proc(name, popen, log))

    def _wait_healthy(self, name: str, url: str, timeout_s: float = 180.0) -> None:
        import httpx

        proc = next(p for p in self.procs if p.name == name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise OptError(
                    f"{name} exited with status {proc.popen.returncode} while starting: {_last_line(proc.log)} (log: {proc.log})"
                )
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise OptError(f"{name} did not answer at {url} within {timeout_s:.0f} s (log: {proc.log})")

    def start(self) -> dict[str, str]:
        """Start every part and wait until each answers; returns the URLs a person opens."""
        for name, port in self.ports.items():
            if not _port_free("127.0.0.1", port):
                raise OptError(f"port {port} (for {name}) is in use on 127.0.0.1: another stack, or stop what holds it")
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        (self.home / "prefect").mkdir(parents=True, exist_ok=True)
        cfg, bin_ = self.cfg.resolved(Path.cwd()), self.bin
        self._start(
            "prefect-server", [str(bin_ / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.ports["prefect"])]
        )
        urls = {"Prefect UI": f"http://127.0.0.1:{self.ports['prefect']}", "PREFECT_API_URL": self.prefect_api}
        if not cfg.tracking.uri.startswith(("http://", "https://")):
            Path(cfg.tracking.artifact_root).mkdir(parents=True, exist_ok=True)
            self._start("mlflow-server", [str(bin_ / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]),
                                          "--workers", "1", "--backend-store-uri", cfg.tracking.uri,
                                          "--default-artifact-root", cfg.tracking.artifact_root])  # fmt: skip
            urls["MLflow UI"] = f"http://127.0.0.1:{self.ports['mlflow']}"
        access = [str(bin_ / "optctl"), "access", "serve", "--host", "127.0.0.1", "--port", str(self.ports["access"])]
        access += (["--config", self.config_path] if self.config_path else []) + [a for kv in self.overrides for a in ("--set", kv)]
        self._start("access-service", access)
        urls["access service"] = f"http://127.0.0.1:{self.ports['access']}"
        self._wait_healthy("prefect-server", f"{self.prefect_api}/health")
        if self.deploy:
            os.environ["PREFECT_API_URL"] = self.prefect_api
            from flows.deployments import deploy

            deploy(self.cfg, self.config_path, self.overrides, Path.cwd())
        else:
            from flows.deployments import ensure_pool

            os.environ["PREFECT_API_URL"] = self.prefect_api
            ensure_pool(cfg.schedule.work_pool)
        self._start("prefect-worker", [str(bin_ / "prefect"), "worker", "start", "--pool", cfg.schedule.work_pool, "--type", "process"])
        if "MLflow UI" in urls:
            self._wait_healthy("mlflow-server", f"{urls['MLflow UI']}/health")
        self._wait_healthy("access-service", f"{urls['access service']}/v1/health")
        return urls

    def stop(self) -> None:
        """Stop every part, newest first: SIGTERM to its process group, SIGKILL after the grace period."""
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for p in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):  # the group too: flow-run processes, server workers
                os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait()
            _wait_group_gone(p.popen.pid)
        self.procs.clear()

    def run(self) -> None:
        """Start, print the URLs, and wait: Ctrl-C or SIGTERM stops the stack; so does any part that exits."""
        # our own handlers: a parent that ignores SIGINT (a background job of a non-interactive shell) would pass that on
        previous = signal.signal(signal.SIGTERM, _interrupt)
        previous_int = signal.signal(signal.SIGINT, _interrupt)
        try:
            urls = self.start()
            print("the stack is up (Ctrl-C stops it all):")
            for what, url in urls.items():
                print(f"  {what:<16} {url}")
            print(f"  logs             {self.home / 'logs'}")
            print(f"in another shell: export PREFECT_API_URL={self.prefect_api}", flush=True)
            while True:
                for p in self.procs:
                    if p.popen.poll() is not None:
                        raise OptError(
                            f"{p.name} exited with status {p.popen.returncode}: {_last_line(p.log)} (log: {p.log}); stopped the stack"
                        )
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("stopping the stack ...", flush=True)
        finally:
            self.stop()
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
        print("stack stopped")
