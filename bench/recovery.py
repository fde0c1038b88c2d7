"""Recovery time and goodput of self-restarting training on a simulated multi-node Ray cluster.

- recovery: kill the node of rank 1 mid-run and time from the kill to the first completed step after the
  restart. Target < 20 s. The cluster keeps one booted spare node, as a large run keeps spare hosts (or
  an autoscaler a warm pool): the restart places the lost rank there, and a new spare is added once the
  run has resumed (its boot, ~2.5 CPU-seconds here, then competes with training on this machine).
- goodput: a run of `--minutes` with a node killed every `--kill-every` seconds, against the same run
  uninterrupted for the same wall time (the peer, measured in this job): goodput = steps per second
  with failures / steps per second without. Target >= 90% for 10 minutes with a kill every 2 minutes.
  The uninterrupted run sees the same node churn (its idle spare is killed and replaced on the same
  schedule), so both pay for booting the same nodes on this shared machine.

Usage: python bench/recovery.py [--quick] [--minutes 10] [--kill-every 120] [--kills 3]
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opt import stages  # noqa: E402
from opt.config import RunConfig, load_config  # noqa: E402
from opt.logbook import Logbook, totals  # noqa: E402
from tests.faults.drills import NODE_DEATH_DETECTION, corpus, node_of_rank, wait_for  # noqa: E402


def run_config(root: Path, src: Path, address: str, run: str, max_steps: int, checkpoint_every: int) -> list[str]:
    values = {
        "storage.root": root / "store",
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
        "tracking.artifact_root": root / "mlartifacts",
        "data.sources": json.dumps([{"name": "d", "kind": "pile", "uri": str(src)}]),
        "data.tokenizer.vocab_size": 300,
        "data.seq_len": 32,
        "model.overrides": "{n_layer: 2, d_model: 32, n_head: 2}",
        "train.run": run,
        "train.ray_address": address,
        "train.max_steps": max_steps,
        "train.checkpoint_every": checkpoint_every,
        "train.micro_batch_size": 4,
        "train.max_failures": 5,
        "train.keep_checkpoints": 2,
        # a step of a real model takes a while; the tiny one is padded to 50 ms
        "train.chaos.step_sleep_s": 0.05,
    }
    return [f"{k}={v}" for k, v in values.items()]


def events(cfg: RunConfig) -> list[dict[str, Any]]:
    return Logbook(stages.run_uri(cfg)).read()


class Drill:
    """`optctl train` in its own driver process, so the run can be ended by killing the driver."""

    def __init__(self, cluster: Any, overrides: list[str]) -> None:
        self.cluster = cluster
        self.cfg = load_config(None, overrides)
        repo = Path(__file__).resolve().parent.parent
        self.driver = subprocess.Popen(
            [sys.executable, "-m", "opt.cli", "train", *[f"--set={o}" for o in overrides]],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Kill the driver: its Ray job (controller and workers) goes with it."""
        self.driver.send_signal(signal.SIGKILL)
        self.driver.wait()
        wait_for(_workers_gone, timeout=120)

    def attempts_started(self) -> int:
        return sum(e["event"] == "first_step" for e in events(self.cfg))

    def kill_rank1_node(self) -> float:
        node_id = node_of_rank(self.cfg, 1)
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        t = time.time()
        self.cluster.remove_node(node, allow_graceful=False)
        return t

    def add_spare(self) -> None:
        """Boot the node that replaces the lost one (the next failure's spare)."""
        self.cluster.add_node(num_cpus=1)

    def replace_spare(self) -> None:
        """The same node churn without a failure (for the uninterrupted run): a spare is killed and replaced."""
        busy = {node_of_rank(self.cfg, rank) for rank in (0, 1)}
        spare = next(n for n in self.cluster.worker_nodes if n.node_id not in busy)
        self.cluster.remove_node(spare, allow_graceful=False)
        self.add_spare()


def recovery(cluster: Any, root: Path, src: Path, kills: int) -> list[float]:
    overrides = run_config(root, src, cluster.address, "recovery", max_steps=100_000, checkpoint_every=20)
    stages.prepare_data(load_config(None, overrides))
    drill = Drill(cluster, overrides)
    cfg = drill.cfg
    times = []
    for k in range(kills):
        wait_for(lambda k=k: drill.attempts_started() == k + 1 and sum(e["event"] == "checkpoint" for e in events(cfg)) > k)
        killed_at = drill.kill_rank1_node()
        try:
            wait_for(lambda k=k: drill.attempts_started() == k + 2)
        except TimeoutError:
            for e in events(cfg)[-12:]:  # what the run did instead of restarting
                print("  logbook:", json.dumps(e)[:400], flush=True)
            raise
        first = [e for e in events(cfg) if e["event"] == "first_step"][-1]
        times.append(first["t"] - killed_at)
        drill.add_spare()
        # where the time went: detection, the driver's decision, the new worker group, the first step
        phases = {}
        for name in ("failure", "restart", "resumed", "workers_started", "first_step"):
            t = next((e["t"] for e in events(cfg) if e["event"] == name and e["t"] >= killed_at), None)
            phases[name] = round(t - killed_at, 1) if t is not None else None
        setup = [e for e in events(cfg) if e["event"] == "workers_started"][-1].get("setup")
        print(f"kill {k + 1}: first step {times[-1]:.1f} s after the kill; phases {phases}; rank 0 setup {setup}", flush=True)
    drill.stop()
    return times


def goodput(cluster: Any, root: Path, src: Path, seconds: float, kill_every: float) -> dict[str, float]:
    results = {}
    for name, kill in (("uninterrupted", False), ("with_failures", True)):
        drill = Drill(cluster, run_config(root, src, cluster.address, f"goodput-{name}", max_steps=10_000_000, checkpoint_every=40))
        cfg = drill.cfg
        wait_for(lambda d=drill: d.attempts_started() >= 1)
        start = time.time()
        next_kill, spare_after = start + kill_every, None
        while time.time() - start < seconds:
            if time.time() >= next_kill:
                next_kill += kill_every
                if kill:
                    drill.kill_rank1_node()
                    spare_after = drill.attempts_started()
                else:  # both runs pay for booting the same nodes on this machine
                    drill.replace_spare()
            if spare_after is not None and drill.attempts_started() > spare_after:  # resumed: replace the spare
                drill.add_spare()
                spare_after = None
            time.sleep(0.2)
        evs = events(cfg)
        step = max([e["step"] for e in evs if e["event"] == "checkpoint" and e["t"] <= start + seconds], default=0)
        results[name] = step / seconds
        lost = totals(evs)
        print(
            f"{name}: {step} committed steps in {seconds:.0f} s; restarts {lost.restarts}, time lost {lost.time_lost_s:.0f} s", flush=True
        )
        # where the steps went: per kill interval, the steps committed and the steady rate once 15 s in
        # (after any restart), so slower steps between restarts show apart from the restarts themselves
        print("  per interval: " + ", ".join(f"{n} steps ({r:.2f}/s steady)" for n, r in intervals(evs, start, seconds, kill_every)))
        drill.stop()
    return {**results, "goodput": results["with_failures"] / results["uninterrupted"]}


def intervals(evs: list[dict[str, Any]], start: float, seconds: float, every: float) -> list[tuple[int, float]]:
    """(steps committed, steady steps/s from 15 s into it) for each `every`-second interval of the run."""
    cks = [(e["t"], e["step"]) for e in evs if e["event"] == "checkpoint"]

    def committed(t: float) -> int:
        return max([s for ts, s in cks if ts <= t], default=0)

    out = []
    lo = start
    while lo < start + seconds - 1:
        hi = min(lo + every, start + seconds)
        steady = [c for c in cks if lo + 15 <= c[0] <= hi]
        rate = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) if len(steady) > 1 else float("nan")
        out.append((committed(hi) - committed(lo), rate))
        lo = hi
    return out


def _workers_gone() -> bool:
    """No training worker holds a CPU any more (the killed driver's job has been torn down)."""
    import ray

    return ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one kill, a 1-minute goodput run with a kill every 30 s")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--recovery-only", action="store_true", help="skip the goodput runs")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--kill-every", type=float, default=120.0)
    args = ap.parse_args()
    if args.quick:
        args.kills, args.minutes, args.kill_every = 1, 1.0, 30.0

    import ray
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "include_dashboard": False, "_system_config": NODE_DEATH_DETECTION}  # as infra/ray/ sets it
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(3):  # two for the run, one spare
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory(prefix="recovery-bench-") as tmp:
            root = Path(tmp)
            src = corpus(root)
            times = recovery(cluster, root, src, args.kills)
            gp = goodput(cluster, root, src, args.minutes * 60, args.kill_every) if not args.recovery_only else {}
    finally:
        ray.shutdown()
        cluster.shutdown()
    figures = {
        "bench": "recovery",
        "recovery_s": [round(t, 2) for t in times],
        "recovery_median_s": round(statistics.median(times), 2),
        "recovery_target_s": 20,
        "goodput_minutes": args.minutes,
        "kill_every_s": args.kill_every,
        "steps_per_s_uninterrupted": round(gp["uninterrupted"], 2) if gp else None,
        "steps_per_s_with_failures": round(gp["with_failures"], 2) if gp else None,
        "goodput": round(gp["goodput"], 4) if gp else None,
        "goodput_target": 0.9,
    }
    print(f"recovery: median {figures['recovery_median_s']} s over {len(times)} kills (target < 20 s)")
    if gp:
        print(f"goodput: {gp['goodput']:.1%} with a node killed every {args.kill_every:.0f} s (target >= 90%)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
