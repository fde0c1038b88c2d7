"""Commit markers: sharded checkpoints written with a real (single-rank gloo) process group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from opt.logbook import Logbook, render_markdown
from opt.model import OPT, OPTConfig
from opt.train.checkpoint import COMMIT_FILE, latest_committed, read_trainer_state, save_sharded, step_uri
from opt.train.export import load_checkpoint_model


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _save(model: OPT, run: Path, step: int, tmp_path: Path) -> str:
    state = {"model": model.state_dict()}
    trainer = {"step": step, "model": model.cfg.to_dict()}
    return save_sharded(state, trainer, str(run), step, rank=0, staging_root=tmp_path)


def test_commit_marker_verification_and_fallback(process_group, tmp_path):
    run = tmp_path / "run"
    cfg = OPTConfig.preset("debug")
    torch.manual_seed(0)
    m1 = OPT(cfg)
    _save(m1, run, 10, tmp_path)
    torch.manual_seed(1)
    m2 = OPT(cfg)
    _save(m2, run, 20, tmp_path)

    newest = latest_committed(str(run))
    assert newest is not None and newest.step == 20
    assert read_trainer_state(newest)["step"] == 20
    restored = load_checkpoint_model(newest, tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), m2.state_dict().values(), strict=True))

    # a half-written step (no commit marker) is never picked
    (Path(step_uri(str(run), 30))).mkdir()
    (Path(step_uri(str(run), 30)) / "__0_0.distcp").write_bytes(b"partial")
    assert latest_committed(str(run)).step == 20

    # a corrupted shard in the newest committed checkpoint: fall back to the previous one, and say so
    shard = next(p for p in Path(step_uri(str(run), 20)).iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    skipped = []
    fallback = latest_committed(str(run), on_skip=lambda uri, why: skipped.append((uri, why)))
    assert fallback.step == 10
    assert skipped and "sha256" in skipped[0][1]
    restored = load_checkpoint_model(fallback, tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), m1.state_dict().values(), strict=True))

    commit = json.loads((Path(step_uri(str(run), 10)) / COMMIT_FILE).read_text())
    assert commit["step"] == 10 and "trainer.json" in commit["files"] and ".metadata" in commit["files"]


def test_logbook_is_append_only_jsonl(tmp_path):
    book = Logbook(str(tmp_path / "run"))
    book.append("run_started", max_steps=5)
    book.append("note", text="lowered LR by hand")
    lines = (tmp_path / "run" / "logbook.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["run_started", "note"]
    md = render_markdown("r", book.read())
    assert "| run_started | max_steps=5 |" in md and "lowered LR by hand" in md


def test_logbook_totals_count_restarts_lost_hosts_and_time():
    from opt.logbook import totals

    def ev(t: float, event: str, **kw: object) -> dict:
        return {"ts": f"T{t}", "t": t, "event": event, **kw}

    events = [
        ev(0, "workers_started", attempt=1),
        ev(5, "first_step", attempt=1),
        ev(20, "checkpoint", step=10),
        ev(30, "failure", attempt=1, rank=1, host="node-b", worker_lost=True),
        ev(30.5, "failure", attempt=1, rank=0, host="node-a", worker_lost=False),  # its peer died: not a lost host
        ev(31, "restart", attempt=2),
        ev(40, "workers_started", attempt=2),
        ev(45, "first_step", attempt=2),
        ev(50, "failure", attempt=2, rank=0, host="node-a", worker_lost=False, error="RuntimeError: boom"),
        ev(51, "restart", attempt=3),
        ev(60, "first_step", attempt=3),
        ev(61, "note", text="swapped a | pipe\nand a newline"),
    ]
    s = totals(events)
    assert (s.restarts, s.failures, s.attempts, s.hosts_lost, s.notes) == (2, 3, 2, ["node-b"], 1)
    # down: 30 -> 45 and 50 -> 60; recomputed: checkpoint 20 -> failure 30, first step 45 -> failure 50
    assert (s.downtime_s, s.recomputed_s, s.time_lost_s) == (25.0, 15.0, 40.0)
    md = render_markdown("r", events)
    assert "- restarts: 2" in md and "- hosts lost: 1 (node-b)" in md and "- time lost: 40.0 s" in md
    assert "swapped a \\| pipe and a newline" in md
