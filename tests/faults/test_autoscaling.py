"""Ray's fake multi-node autoscaler: the nodes a training job asks for are launched, replaced and removed.

The autoscaler and its "cloud" run on this machine (`RAY_FAKE_CLUSTER`): each node it launches is a raylet
process. Worker nodes start at zero; the head has no CPUs, so every worker needs a launched node.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from opt import stages
from tests.faults.drills import config, corpus, events, node_of_rank, train_in_background, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _autoscaling_cluster_class() -> type:
    from ray.cluster_utils import AutoscalingCluster

    class LocalAutoscalingCluster(AutoscalingCluster):
        """Ray's wheel lacks fake_multi_node/example.yaml, which the base class reads: build the config here."""

        def _generate_config(self, head_resources: dict, worker_node_types: dict, autoscaler_v2: bool = False, **kwargs: Any) -> dict:
            config = {
                "cluster_name": "fake_multinode",
                "max_workers": 4,
                "provider": {
                    "type": "fake_multinode",
                    "use_node_id_as_ip": True,
                    "disable_node_updaters": True,
                    "disable_launch_config_check": True,
                },  # fmt: skip
                "available_node_types": {
                    **worker_node_types,
                    "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
                },
                "head_node_type": "ray.head.default",
                "auth": {},
                "upscaling_speed": 1.0,
                "idle_timeout_minutes": 0.1,
                "docker": {},
                **{
                    k: []
                    for k in (
                        "initialization_commands",
                        "setup_commands",
                        "head_setup_commands",
                        "worker_setup_commands",
                        "head_start_ray_commands",
                        "worker_start_ray_commands",
                        "cluster_synced_files",
                        "rsync_exclude",
                        "rsync_filter",
                    )
                },  # fmt: skip
                "file_mounts": {},
                "file_mounts_sync_continuously": False,
            }
            return {**config, **kwargs}

    return LocalAutoscalingCluster


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    import ray

    ray.shutdown()
    # the base class runs the `ray` CLI: the one beside this interpreter (the venv's bin is not always on PATH)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster = _autoscaling_cluster_class()(
        head_resources={"CPU": 0},
        worker_node_types={"cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3}},
    )
    cluster.start()
    try:
        ray.init(address="auto", configure_logging=False)
        root = tmp_path_factory.mktemp("autoscaling")
        yield {"address": "auto", "root": root, "src": corpus(root)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def worker_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]


def kill_node(node_id: str) -> None:
    """SIGKILL every process of the fake node `node_id` (its raylet and the workers it started), as if its machine went away."""
    victims = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # the provider starts each node's processes with the node id in their environment; their children inherit it
        if f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() in environ:
            victims.append(int(pid))
    assert victims, f"no processes for node {node_id}"
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_training_scales_up_from_zero_survives_a_lost_node_and_scales_down(autoscaling):
    assert worker_nodes() == []
    cfg = config(autoscaling, "autoscaled", **{"train.max_failures": 3})
    stages.prepare_data(cfg)
    thread, out = train_in_background(cfg)
    wait_for(lambda: any(e["step"] == 4 for e in events(cfg, "checkpoint")), timeout=240)
    launched = set(worker_nodes())
    assert len(launched) >= 2  # the autoscaler launched the two nodes the job asked for
    lost = node_of_rank(cfg, 1)
    kill_node(lost)
    thread.join(timeout=400)
    assert "error" not in out, out.get("error")
    assert out["result"].checkpoint.step == 12
    assert any(f["rank"] == 1 and f["worker_lost"] for f in events(cfg, "failure"))
    last = events(cfg, "workers_started")[-1]
    assert lost not in {w["node"] for w in last["workers"].values()}  # a replacement ran rank 1
    # idle nodes go away once the job is done (idle timeout 6 s)
    wait_for(lambda: worker_nodes() == [], timeout=180)
