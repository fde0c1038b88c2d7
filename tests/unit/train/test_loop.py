"""The training loop on real gloo ranks (spawned CPU processes, no Ray): spikes, optimizer switches,
N-to-M resharding, retention and asynchronous checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from opt import storage
from opt.config import RunConfig, load_config
from opt.data.prep import prepare_dataset
from opt.logbook import Logbook
from opt.train.checkpoint import latest_committed, read_trainer_state, step_uri
from tests import numerics
from tests.conftest import write_jsonl
from tests.distributed import run_ranks

TEXT = "The quick brown fox {} jumps over the lazy dog while the cat watches from the warm windowsill. "


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    from opt.tracking import get_or_create_run

    root = tmp_path_factory.mktemp("loop")
    src = write_jsonl(root / "in" / "docs.jsonl", [{"text": TEXT.format(i) * 6} for i in range(200)])
    cfg = load_config(None, [f"storage.root={root / 'store'}", f"data.sources=[{{name: d, kind: pile, uri: '{src}'}}]",
                             "data.tokenizer.vocab_size=300", "data.seq_len=32", "data.valid_fraction=0.1"])  # fmt: skip
    manifest, _ = prepare_dataset(cfg.data, cfg.storage.root)
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    run_id = get_or_create_run(tracking, "loop", str(root / "artifacts"), "loop", None, tags={})
    return {"root": root, "data": cfg.data.model_dump(mode="json"), "manifest": manifest.to_json(), "tracking": tracking, "run_id": run_id}


def config(root: Path, run: str, data: dict | None = None, **train: Any) -> RunConfig:
    base = {"run": run, "num_workers": 2, "max_steps": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 4}
    base.update(train)
    return RunConfig.model_validate(
        {
            "storage": {"root": str(root / "store")},
            "data": data or {},
            "model": {"preset": "debug", "overrides": {"n_layer": 2, "d_model": 32, "n_head": 2}},
            "train": base,
        }
    )


def payload(setup: dict[str, Any], run: str, **train: Any) -> dict[str, Any]:
    cfg = config(setup["root"], run, setup["data"], **train)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": setup["tracking"]})})
    return {
        "config": cfg.model_dump(mode="json"),
        "manifest": setup["manifest"],
        "run_uri": storage.join(cfg.storage.root, "runs", run),
        "mlflow_run_id": setup["run_id"],
        "cache_dir": str(setup["root"] / "cache"),
    }


def _train(p: dict[str, Any]) -> dict[str, Any]:
    """Rank body: train, then return what the tests compare (full, unsharded tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from opt.train.loop import run_training

    trainer = run_training(p, dist.get_rank(), dist.get_world_size())
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "step": trainer.step,
        "optimizer": type(trainer.optimizer).__name__,
        "betas": trainer.optimizer.param_groups[0].get("betas"),
        "dormant": sorted(trainer.dormant),
        "model": get_model_state_dict(trainer.model, options=full),
        "optim": get_optimizer_state_dict(trainer.model, trainer.optimizer, options=full),
        "spikes": trainer.state.to_dict(),
    }


def _restore(p: dict[str, Any]) -> dict[str, Any]:
    """Rank body: load the newest checkpoint of the run without training."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from opt.config import RunConfig
    from opt.data.manifest import DatasetManifest
    from opt.train.loop import Trainer
    from opt.train.recipe import resolve

    cfg = RunConfig.model_validate(p["config"])
    manifest = DatasetManifest.from_json(p["manifest"])
    t, world = cfg.train, dist.get_world_size()
    recipe = resolve("debug", manifest.seq_len, world, t.micro_batch_size, t.max_steps, t.lr, t.warmup_steps)
    trainer = Trainer(cfg, cfg.model.build(manifest.vocab_size, manifest.seq_len), recipe, dist.get_rank(), world, "cpu")
    ckpt = latest_committed(p["run_uri"])
    assert ckpt is not None
    trainer.restore(ckpt, p["cache_dir"])
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=full)
    return {"model": get_model_state_dict(trainer.model, options=full), "optim": optim}


def _initial_weights(setup: dict[str, Any], p: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights every run of `p`'s config starts from (the trainer's `fresh`: its seed, then the full model)."""
    from opt.data.manifest import DatasetManifest
    from opt.model import OPT

    cfg = RunConfig.model_validate(p["config"])
    manifest = DatasetManifest.from_json(setup["manifest"])
    torch.manual_seed(cfg.train.seed)
    return OPT(cfg.model.build(manifest.vocab_size, manifest.seq_len)).state_dict()


def events(p: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in Logbook(p["run_uri"]).read() if e["event"] == name]


def assert_same(a: Any, b: Any) -> None:
    """Nested state dicts equal bitwise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_poisoned_batch_and_nan_roll_back_skip_data_lower_lr_and_finish(setup):
    from mlflow.tracking import MlflowClient

    p = payload(setup, "spiky", max_steps=12, spikes={"warmup_steps": 2}, chaos={"poison_batches": [6], "nan_batches": [9]})
    result = run_ranks(_train, 2, p)[0]

    assert result["step"] == 12
    spikes = events(p, "spike")
    assert [e["data_step"] for e in spikes] == [6, 9]
    assert "running average" in spikes[0]["reason"] and "nan" in spikes[1]["reason"]
    rollbacks = events(p, "rollback")
    # both spikes came before step 8's checkpoint: back to step 4 each time, skipping the window that led there
    assert [(e["to_step"], e["skipped_data_steps"]) for e in rollbacks] == [(4, [4, 6]), (4, [7, 9])]
    assert [e["lr_scale"] for e in rollbacks] == [0.5, 0.25]
    assert result["spikes"]["data_offset"] == 6 and result["spikes"]["rollbacks"] == 2
    final = latest_committed(p["run_uri"])
    assert final is not None and final.step == 12
    assert read_trainer_state(final)["spikes"]["lr_scale"] == 0.25
    assert all(torch.isfinite(v).all() for v in result["model"].values())
    history = MlflowClient(setup["tracking"]).get_metric_history(setup["run_id"], "spike_rollbacks")
    assert sorted(m.value for m in history) == [1, 2]


def test_endless_spikes_give_up_without_a_final_checkpoint(setup):
    p = payload(setup, "hopeless", spikes={"warmup_steps": 2, "max_rollbacks": 1}, chaos={"poison_batches": list(range(5, 40))})
    result = run_ranks(_train, 2, p)[0]
    gave_up = events(p, "spike_gave_up")
    assert result["step"] < 8 and gave_up and gave_up[-1]["rollbacks"] == 1
    assert latest_committed(p["run_uri"]).step == 4


def test_switch_adamw_to_sgd_and_back_carries_the_adam_state(setup):
    run = "switch"
    first = run_ranks(_train, 2, payload(setup, run, max_steps=4))[0]
    assert first["optimizer"] == "AdamW"
    sgd = run_ranks(_train, 2, payload(setup, run, max_steps=8, optimizer="sgd"))[0]
    assert sgd["optimizer"] == "SGD" and sgd["dormant"] == ["adamw"]
    back = run_ranks(_train, 2, payload(setup, run, max_steps=12, betas=[0.9, 0.99]))[0]
    assert back["optimizer"] == "AdamW" and back["dormant"] == ["sgd"] and back["betas"] == (0.9, 0.99)
    # Adam's moments came back from step 4 and went on: 4 steps before the switch plus 4 after it
    adam_steps = {float(s["step"]) for s in back["optim"]["state"].values()}
    assert adam_steps == {8.0}
    saved = read_trainer_state(latest_committed(payload(setup, run)["run_uri"]))
    assert saved["hparams"]["optimizer"] == "adamw" and saved["dormant_optimizers"] == ["sgd"]


def test_checkpoint_saved_on_two_ranks_loads_on_one_and_four(setup):
    p = payload(setup, "reshard", max_steps=4)
    saved = run_ranks(_train, 2, p)[0]
    for world in (1, 4):
        loaded = run_ranks(_restore, world, payload(setup, "reshard", max_steps=4, num_workers=world))[0]
        assert_same(saved["model"], loaded["model"])
        assert_same(saved["optim"]["state"], loaded["optim"]["state"])


def test_async_checkpoints_equal_sync_ones_and_retention_keeps_the_newest(setup):
    common = {"max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 2, "keep_every": 4, "peak_tflops": 0.5}
    sync = payload(setup, "sync", **common)
    background = payload(setup, "async", async_checkpoint=True, **common)
    a, b = run_ranks(_train, 2, sync)[0], run_ranks(_train, 2, background)[0]
    assert_same(a["model"], b["model"])
    for p in (sync, background):
        kept = sorted(int(Path(f).parent.name.split("-")[1]) for f in storage.list_files(p["run_uri"]) if f.endswith("COMMIT.json"))
        assert kept == [4, 6, 8]  # newest two plus every 4th
        assert not storage.exists(step_uri(p["run_uri"], 2))
        assert events(p, "checkpoints_deleted")
    commits = [json.loads(storage.read_text(storage.join(step_uri(background["run_uri"], s), "COMMIT.json"))) for s in (6, 8)]
    assert all(c["files"] for c in commits)
    metrics = read_trainer_state(latest_committed(sync["run_uri"]))["metrics"]
    # MFU against the configured peak, and this rank's peak memory
    assert 0 < metrics["mfu"] == pytest.approx(metrics["tflops_per_s"] / 2 / 0.5) and 0 < metrics["memory_gb"] < 24


def test_tensor_parallel_by_data_parallel_trains_like_data_parallel_alone(setup):
    from opt.train.export import load_checkpoint_model

    dp_only = run_ranks(_train, 2, payload(setup, "dp2", max_steps=4))[0]
    tp = payload(setup, "tp2xdp2", max_steps=4, num_workers=4, tensor_parallel=2)
    run_ranks(_train, 4, tp)
    ckpt = latest_committed(tp["run_uri"])
    reference = read_trainer_state(latest_committed(payload(setup, "dp2")["run_uri"]))
    assert read_trainer_state(ckpt)["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    # the export joins the tp shards back into plain OPT weights: the same 4 AdamW updates from the same init, within
    # fp32 roundoff as Adam spreads it (tests/numerics.py); k_proj.bias, whose gradient is analytically zero (its
    # second moment says so too), moves by Adam's noise alone, so its reach is all there is to compare
    exported = load_checkpoint_model(ckpt, setup["root"] / "cache").state_dict()
    assert exported.keys() == dp_only["model"].keys()
    start = _initial_weights(setup, tp)
    noise = numerics.analytically_zero(exported)
    assert noise and noise <= numerics.at_roundoff({k: s["exp_avg_sq"].sqrt() for k, s in dp_only["optim"]["state"].items()})
    numerics.assert_within(numerics.update_usage(exported, dp_only["model"], start, skip=noise), "tp2 x dp2 updates")
    numerics.assert_within(numerics.adam_reach_usage(exported, dp_only["model"], reference["hparams"]["lr"], 4), "tp2 x dp2 reach")
    # resumed on 2 ranks: the same tp degree, data parallelism resharded from 2 to 1
    assert run_ranks(_train, 2, payload(setup, "tp2xdp2", max_steps=6, num_workers=2, tensor_parallel=2))[0]["step"] == 6
    with pytest.raises(Exception, match="tensor_parallel=2"):
        run_ranks(_train, 2, payload(setup, "tp2xdp2", max_steps=8, num_workers=2))
