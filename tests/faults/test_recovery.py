"""Recovery drills on a multi-node Ray cluster simulated on this machine (`ray.cluster_utils.Cluster`).

A head node (no CPUs: it hosts the driver's controller) and one 1-CPU node per worker, so killing a node
kills exactly one rank. Runs use a tiny model with `train.chaos.step_sleep_s` so a drill can strike mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from opt import stages, storage
from opt.config import RunConfig
from opt.logbook import Logbook
from opt.train.checkpoint import COMMIT_FILE, step_uri
from tests.conftest import REPO
from tests.faults.drills import (
    NODE_DEATH_DETECTION,
    config,
    corpus,
    events,
    final_weights,
    node_of_rank,
    settings,
    train_in_background,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a local instance from earlier tests; this module needs its own cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": NODE_DEATH_DETECTION})
    for _ in range(2):
        c.add_node(num_cpus=1)
    ray.init(address=c.address, configure_logging=False)
    root = tmp_path_factory.mktemp("faults")
    src = corpus(root)
    yield {"cluster": c, "address": c.address, "root": root, "src": src}
    ray.shutdown()
    c.shutdown()


def kill_node(env: dict[str, Any], node_id: str) -> None:
    """Kill the raylet (and its workers) of one node at once, then add a fresh node as an autoscaler would."""
    c = env["cluster"]
    node = next(n for n in c.worker_nodes if n.node_id == node_id)
    c.remove_node(node, allow_graceful=False)
    c.add_node(num_cpus=1)


@pytest.fixture(scope="module")
def reference(cluster):
    """An uninterrupted run, and the dataset every drill trains on."""
    cfg = config(cluster, "reference")
    stages.prepare_data(cfg)
    result = stages.train(cfg)
    assert result.checkpoint.step == 12
    return final_weights(cfg, cluster["root"] / "cache-ref")


def test_a_killed_worker_node_is_replaced_and_the_run_ends_bitwise_equal(cluster, reference):
    import torch

    cfg = config(cluster, "node-kill")
    thread, out = train_in_background(cfg)
    wait_for(lambda: any(e["step"] == 4 for e in events(cfg, "checkpoint")))
    kill_node(cluster, node_of_rank(cfg, 1))
    thread.join(timeout=300)
    assert "error" not in out, out.get("error")
    assert out["result"].checkpoint.step == 12
    weights = final_weights(cfg, cluster["root"] / "cache-kill")
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    failures = events(cfg, "failure")
    assert any(f["rank"] == 1 and f["worker_lost"] for f in failures), failures
    # rank 0 only lost its peer: its node is not blamed, or every kill would count towards excluding it
    assert all(f["blamed"] == (f["rank"] == 1) for f in failures if "rank" in f), failures
    assert events(cfg, "restart") and events(cfg, "resumed")[-1]["step"] >= 4
    md = stages_logbook(cfg)
    assert "- restarts: 1" in md and "- hosts lost: 1" in md
    # every step's metrics reached MLflow, those of the attempt the kill ended included
    from mlflow.tracking import MlflowClient

    history = MlflowClient(cfg.tracking.uri).get_metric_history(out["result"].mlflow_run_id, "loss")
    assert {m.step for m in history} == set(range(1, 13))


def stages_logbook(cfg: RunConfig) -> str:
    from opt.logbook import render_markdown

    return render_markdown(cfg.train.run, Logbook(stages.run_uri(cfg)).read())


def test_a_node_killed_while_a_checkpoint_is_written_resumes_from_the_previous_one(cluster, reference):
    cfg = config(cluster, "ckpt-kill", **{"train.chaos.checkpoint_sleep_s": 8})
    thread, out = train_in_background(cfg)
    step8 = step_uri(stages.run_uri(cfg), 8)
    # shards of step 8 are on disk, its commit marker is not
    wait_for(lambda: storage.exists(storage.join(step8, ".metadata")))
    assert not storage.exists(storage.join(step8, COMMIT_FILE))
    kill_node(cluster, node_of_rank(cfg, 1))
    thread.join(timeout=300)
    assert "error" not in out, out.get("error")
    assert out["result"].checkpoint.step == 12
    assert events(cfg, "resumed")[-1]["step"] == 4  # the half-written step 8 was never loaded


def test_a_hung_collective_times_out_and_the_run_restarts(cluster, reference):
    cfg = config(cluster, "hang", **{"train.chaos.hang_at_step": 6})
    result = stages.train(cfg)
    assert result.checkpoint.step == 12
    failures = events(cfg, "failure")
    assert failures and failures[0]["attempt"] == 1
    assert events(cfg, "workers_started")[-1]["attempt"] == 2


def test_a_killed_driver_is_resumed_by_running_the_same_command_again(cluster, reference):
    cfg = config(cluster, "driver-kill")
    args = [f"--set={k}={v}" for k, v in settings(cluster, "driver-kill").items()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-m", "opt.cli", "train", *args], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: any(e["step"] == 4 for e in events(cfg, "checkpoint")), timeout=180)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    result = stages.train(cfg)
    assert result.checkpoint.step == 12
    assert events(cfg, "resumed")[-1]["step"] >= 4


def test_workers_that_always_crash_stop_the_run_with_the_reason(cluster, reference):
    from opt.train.job import TrainingError

    cfg = config(cluster, "crash", **{"train.chaos.crash_at_step": 2, "train.max_failures": 1})
    with pytest.raises(TrainingError, match=r"2 failed attempts in a row without a new checkpoint.*crashes at step 2"):
        stages.train(cfg)
    assert [f["attempt"] for f in events(cfg, "failure")] == [1, 2]
    assert "crashes at step 2" in events(cfg, "run_failed")[-1]["error"]


def test_a_node_that_keeps_failing_is_kept_out_of_the_restart(cluster, reference):
    import ray

    c = cluster["cluster"]
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    assert len(nodes) == 2  # both must take part in the first attempt
    bad = nodes[0]
    cfg = config(cluster, "bad-node", **{"train.chaos.crash_on_nodes": f"[{bad}]", "train.exclude_node_after": 1,
                                         "train.chaos.step_sleep_s": 3, "train.max_steps": 4, "train.checkpoint_every": 2})  # fmt: skip
    thread, out = train_in_background(cfg)
    # a spare joins while the first attempt runs its first (slow) step, so there is room to leave the bad node out
    wait_for(lambda: events(cfg, "workers_started"))
    spare = c.add_node(num_cpus=1)
    try:
        thread.join(timeout=300)
        assert "error" not in out, out.get("error")
        assert out["result"].checkpoint.step == 4
        assert [e["node"] for e in events(cfg, "node_excluded")] == [bad]
        last = events(cfg, "workers_started")[-1]
        assert bad not in {w["node"] for w in last["workers"].values()}
    finally:
        c.remove_node(spare)


def test_an_elastic_run_starts_with_the_workers_the_cluster_has(cluster, reference):
    # room for 2 workers, 3 asked for, 1 accepted: the batch (4 x 32 tokens x 6) is reachable with 1, 2 or 3
    cfg = config(cluster, "elastic", **{"train.num_workers": 3, "train.min_workers": 1, "train.batch_tokens": 768, "train.max_steps": 4})
    result = stages.train(cfg)
    assert result.checkpoint.step == 4
    assert events(cfg, "workers_started")[-1]["world_size"] in (1, 2)


PROBE = """
import os, sys, ray
from opt.config import load_config
from opt.train.job import _ray_init

_ray_init(load_config(None, [f"train.ray_address={sys.argv[1]}", "train.lost_actor_grace_ms=250"]))
NAME = "RAY_timeout_ms_task_wait_for_death_info"

@ray.remote(num_cpus=0)
class Worker:  # started by an actor with its own env vars, as Ray Train starts its workers
    def env(self):
        return os.environ.get(NAME)

@ray.remote(num_cpus=0)
class Controller:
    def env(self):
        worker = Worker.options(runtime_env={"env_vars": {"OTHER": "1"}}).remote()
        return os.environ.get(NAME), ray.get(worker.env.remote())

print(*ray.get(Controller.remote().env.remote()))
"""


def test_the_lost_actor_grace_reaches_every_process_of_the_job(cluster):
    """Ray Train's controller tears a group with a dead worker down through calls to that worker, each
    waiting `train.lost_actor_grace_ms` for Ray to confirm the death: the setting must reach the controller
    and the workers, which are actors of the driver's job (a core-worker setting, read at process start)."""
    out = subprocess.run([sys.executable, "-c", PROBE, cluster["address"]], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["250", "250"]
