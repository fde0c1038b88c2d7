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
