"""`optctl train` as a new user meets it, through the real CLI (subprocesses on the session's Ray instance):
one trainer per run, refusals before Ray starts, Ctrl-C that stops cleanly and resumes exactly, MLflow runs that end.

Each refusal is checked for its one line, its exit status and that it wrote nothing of the run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opt import stages
from opt.config import load_config
from opt.logbook import Logbook
from tests.conftest import REPO
from tests.integration.conftest import overrides, tracking_uri

pytestmark = pytest.mark.slow


def optctl_args(root: Path, **extra: object) -> list[str]:
    return [a for kv in overrides(root, **extra) for a in ("--set", kv)]


def start(root: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OPT_HOME": str(root / "home")}
    return subprocess.Popen([sys.executable, "-m", "opt.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def run(root: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], float]:
    t = time.monotonic()
    p = start(root, *args)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), time.monotonic() - t


def wait_for(pred, what: str, timeout: float = 240) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def own_lines(err: str) -> list[str]:
    """stderr without the lines Ray forwards from its actors (`(Name pid=N) ...`): what optctl itself printed.
    (Here a subprocess starts a second local Ray instance beside the session's, and Ray's PlacementGroupCleaner
    prints a traceback about the two; sending Ray's chatter to a log file is a separate item of issue 15.)"""
    return [line for line in err.splitlines() if not re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", line)]


def events(root: Path, run_name: str) -> list[dict]:
    return Logbook(str(root / "store" / "runs" / run_name)).read()


def mlflow_status(root: Path, run_name: str) -> str:
    from mlflow.tracking import MlflowClient

    record = json.loads((root / "store" / "runs" / run_name / "run.json").read_text())
    return MlflowClient(tracking_uri(root)).get_run(record["mlflow_run_id"]).info.status


def test_a_second_trainer_is_refused_while_the_first_finishes_then_a_changed_preset_is_refused(pipeline_run):
    root, _ = pipeline_run
    args = optctl_args(root, **{"train.run": "lease", "train.max_steps": 30, "train.checkpoint_every": 10})
    first = start(root, "train", *args)
    lease = root / "store" / "runs" / "lease" / "LEASE.json"
    wait_for(lambda: any(e["event"] == "run_started" for e in events(root, "lease")) if lease.exists() else False, "the first trainer")
    before = len(events(root, "lease"))
    second, took = run(root, "train", *args)
    assert second.returncode == 2 and took < 60, second.stderr
    lines = second.stderr.strip().splitlines()
    assert "Traceback" not in second.stderr and [line for line in lines if line.startswith("error:")] == lines[-1:], second.stderr
    holder = json.loads(lease.read_text())
    assert f"is being trained by {holder['host']} pid {first.pid} since " in second.stderr
    assert not [e for e in events(root, "lease")[before:] if e["event"] in ("run_started", "run_resumed", "config_changed")]
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert events(root, "lease")[-1]["event"] == "run_finished" and not lease.exists()
    assert mlflow_status(root, "lease") == "FINISHED"

    # the same run with another model: refused before Ray starts, in one line, with nothing written
    before = events(root, "lease")
    changed, took = run(root, "train", *optctl_args(root, **{"train.run": "lease", "train.max_steps": 40, "model.preset": "125m"}))
    assert changed.returncode == 2 and took < 60 and "Traceback" not in changed.stderr
    line = changed.stderr.strip().splitlines()[-1]
    assert "has another model architecture" in line and "n_layer 2 -> 12" in line and "start a new run" in line, line
    assert events(root, "lease") == before


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes_bitwise_exact(pipeline_run):
    import torch

    from opt.train.export import load_checkpoint_model

    root, _ = pipeline_run
    settings = {"train.max_steps": 12, "train.checkpoint_every": 3}
    args = optctl_args(root, **{**settings, "train.run": "sigint"})
    p = start(root, "train", *args)
    wait_for(lambda: any(e["event"] == "checkpoint" for e in events(root, "sigint")), "the first checkpoint")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 130, err[-3000:]
    assert not [line for line in own_lines(err) if "Traceback" in line], err[-3000:]
    line = own_lines(err.strip())[-1]
    (stopped,) = [e for e in events(root, "sigint") if e["event"] == "interrupted"]
    assert stopped["signal"] == "SIGINT" and stopped["step"] >= 3
    assert line == (f"training run 'sigint' stopped by SIGINT: newest committed checkpoint {stopped['checkpoint']} "
                    f"(step {stopped['step']}); the same command resumes it")  # fmt: skip
    assert mlflow_status(root, "sigint") == "KILLED"
    assert not (root / "store" / "runs" / "sigint" / "LEASE.json").exists()

    resumed, _ = run(root, "train", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert mlflow_status(root, "sigint") == "FINISHED"
    uninterrupted = stages.train(load_config(None, overrides(root, **{**settings, "train.run": "sigint-ref"})))
    a = load_checkpoint_model(stages.checkpoint(load_config(None, overrides(root, **{"train.run": "sigint"}))), root / "c1").state_dict()
    b = load_checkpoint_model(uninterrupted.checkpoint, root / "c2").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_dead_trainers_lease_is_taken_over_then_sigterm_stops_cleanly_with_143_and_mlflow_killed(pipeline_run):
    # One trainer for both behaviours (each `optctl train` costs ~30 s of Ray start-up here): it first finds the
    # lease of a trainer that died ten minutes ago on another host and takes it over, then it gets SIGTERM.
    root, _ = pipeline_run
    run_dir = root / "store" / "runs" / "sigterm"
    run_dir.mkdir(parents=True)
    old = time.time() - 600
    (run_dir / "LEASE.json").write_text(json.dumps({"token": "dead", "host": "node-gone", "pid": 4242, "since": old, "heartbeat": old,
                                                    "ttl_s": 120, "command": "optctl train"}))  # fmt: skip
    p = start(root, "train", *optctl_args(root, **{"train.run": "sigterm", "train.max_steps": 40, "train.checkpoint_every": 2}))
    wait_for(lambda: any(e["event"] == "checkpoint" for e in events(root, "sigterm")), "the first checkpoint")
    (taken,) = [e for e in events(root, "sigterm") if e["event"] == "lease_taken_over"]
    assert taken["previous_holder"].startswith("node-gone pid 4242 since ")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 143, err[-3000:]
    assert own_lines(err.strip())[-1].startswith("training run 'sigterm' stopped by SIGTERM: newest committed checkpoint ")
    assert [e["signal"] for e in events(root, "sigterm") if e["event"] == "interrupted"] == ["SIGTERM"]
    assert mlflow_status(root, "sigterm") == "KILLED"
    assert not (run_dir / "LEASE.json").exists()


def test_an_unreachable_ray_address_is_refused_within_its_timeout(pipeline_run):
    root, _ = pipeline_run
    r, took = run(root, "train", *optctl_args(root, **{"train.run": "noray", "train.ray_address": "127.0.0.1:1",
                                                       "train.ray_connect_timeout_s": 3}))  # fmt: skip
    assert r.returncode == 2 and took < 60 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: the Ray cluster at train.ray_address=127.0.0.1:1 does not answer")
    run_dir = root / "store" / "runs" / "noray"
    assert not (run_dir / "run.json").exists() and not (run_dir / "logbook.jsonl").exists() and not (run_dir / "LEASE.json").exists()


CHATTER = ("pid=", "RayTrainWorker", "TrainController", "PlacementGroupCleaner", "TrainingReport", "Token authentication",
           "Task run", "Flow run", "prefect", "Prefect", "mlflow.store", "alembic", "it/s]", "Traceback")  # fmt: skip


def test_the_pipeline_prints_our_lines_only_and_names_its_log_file(pipeline_run):
    root, _ = pipeline_run
    extra = {"train.run": "quiet", "registry.model_name": "opt-it-quiet", "train.max_steps": 4, "train.checkpoint_every": 4}
    r, _ = run(root, "pipeline", "run", *optctl_args(root, **extra), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    noise = [line for line in lines if any(c in line for c in CHATTER) and not line.startswith("  this command's log ")]
    assert not noise, noise
    assert len(lines) <= 40, lines
    assert any(line.startswith("training: run quiet committed step 4") for line in lines)
    assert any(line.startswith("registered  opt-it-quiet v1: gate passed") for line in lines)
    (log_line,) = [line for line in lines if line.startswith("  this command's log ")]
    log_file = Path(log_line.split()[3])
    text = log_file.read_text()
    assert "ray" in text.lower() and "prefect" in text.lower()  # the chatter is kept, off the terminal
