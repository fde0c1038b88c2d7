"""What the fault drills share: a tiny corpus and run config, logbook polling, background training."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from opt import stages
from opt.config import RunConfig, load_config
from opt.logbook import Logbook
from tests.conftest import write_jsonl

# The head's node-death detection as infra/ray/ configures it: 3 missed health checks 1 s apart (Ray's
# default is 5 x 3 s, during which a restart may try to pull from the dead node's object store).
NODE_DEATH_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

TEXT = "The quick brown fox {} jumps over the lazy dog while the cat watches from the warm windowsill. "


def corpus(root: Path) -> Path:
    return write_jsonl(root / "in" / "docs.jsonl", [{"text": TEXT.format(i) * 6} for i in range(200)])


def settings(env: dict[str, Any], run: str, **extra: Any) -> dict[str, Any]:
    root = env["root"]
    values = {
        "storage.root": root / "store",
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
        "tracking.artifact_root": root / "mlartifacts",
        "tracking.experiment": "faults",
        "data.sources": json.dumps([{"name": "d", "kind": "pile", "uri": str(env["src"])}]),
        "data.tokenizer.vocab_size": 300,
        "data.seq_len": 32,
        "data.valid_fraction": 0.1,
        "model.overrides": "{n_layer: 2, d_model: 32, n_head: 2, dropout: 0.1}",
        "train.run": run,
        "train.ray_address": env["address"],
        "train.max_steps": 12,
        "train.checkpoint_every": 4,
        "train.micro_batch_size": 4,
        "train.warmup_steps": 2,
        "train.max_failures": 2,
        "train.collective_timeout_s": 20,
        "train.chaos.step_sleep_s": 0.5,
    }
    return {**values, **extra}


def config(env: dict[str, Any], run: str, **extra: Any) -> RunConfig:
    return load_config(None, [f"{k}={v}" for k, v in settings(env, run, **extra).items()])


def events(cfg: RunConfig, name: str) -> list[dict[str, Any]]:
    return [e for e in Logbook(stages.run_uri(cfg)).read() if e["event"] == name]


def wait_for(predicate: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the drill's trigger never came")
        time.sleep(0.2)


def node_of_rank(cfg: RunConfig, rank: int) -> str:
    started = events(cfg, "workers_started")[-1]
    return started["workers"][str(rank)]["node"]


def train_in_background(cfg: RunConfig) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = stages.train(cfg)
        except Exception as e:  # surfaced by the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def final_weights(cfg: RunConfig, cache: Path) -> dict[str, Any]:
    from opt.train.export import load_checkpoint_model

    return load_checkpoint_model(stages.checkpoint(cfg), cache).state_dict()
