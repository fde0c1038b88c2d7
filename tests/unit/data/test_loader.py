from __future__ import annotations

import numpy as np
import pytest
import torch

from opt.data.loader import TrainBatches, eval_batches
from opt.data.manifest import DatasetError
from opt.train.schedule import lr_at


def test_train_batches_are_shifted_windows_disjoint_across_ranks():
    tokens = np.arange(1000, dtype=np.uint16)
    r0 = TrainBatches(tokens, seq_len=10, micro_batch=4, rank=0, world=2, seed=7)
    r1 = TrainBatches(tokens, seq_len=10, micro_batch=4, rank=1, world=2, seed=7)
    x0, y0 = r0.batch(3)
    x1, _ = r1.batch(3)
    assert x0.shape == (4, 10) and x0.dtype == torch.int64
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are inputs shifted by one
    starts0, starts1 = set(x0[:, 0].tolist()), set(x1[:, 0].tolist())
    assert not starts0 & starts1  # ranks read different windows at the same step
    assert all(s % 10 == 0 for s in starts0 | starts1)


def test_batch_depends_only_on_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16)
    a = TrainBatches(tokens, 16, 2, 0, 1, seed=1)
    b = TrainBatches(tokens, 16, 2, 0, 1, seed=1)
    for step in (0, 5, 400):  # 400 steps is past one epoch (312 windows)
        assert torch.equal(a.batch(step)[0], b.batch(step)[0])
    b.batch(0)  # visiting steps in another order changes nothing
    assert torch.equal(a.batch(5)[0], b.batch(5)[0])
    assert not torch.equal(a.batch(1)[0], TrainBatches(tokens, 16, 2, 0, 1, seed=2).batch(1)[0])


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        TrainBatches(np.arange(50, dtype=np.uint16), 16, 4, 0, 2, 0)


def test_eval_batches_cover_every_token_once():
    tokens = np.arange(95, dtype=np.uint16)
    seen = []
    for x, y in eval_batches(tokens, seq_len=10, batch_size=4):
        assert torch.equal(x[:, 1:], y[:, :-1])
        seen.extend(y.reshape(-1).tolist())
    assert seen == list(range(1, 95))


def test_lr_schedule_warmup_then_linear_decay_to_ten_percent():
    lrs = [lr_at(s, 1.0, warmup=10, total=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_sources_are_mixed_by_weight_times_size():
    small = np.full(10_001, 1, dtype=np.uint16)  # 1,000 windows of 10 tokens
    large = np.full(40_001, 2, dtype=np.uint16)  # 4,000 windows
    natural = TrainBatches([(small, 1.0), (large, 1.0)], seq_len=10, micro_batch=50, rank=0, world=1, seed=0)
    upsampled = TrainBatches([(small, 4.0), (large, 1.0)], seq_len=10, micro_batch=50, rank=0, world=1, seed=0)

    def share_of_small(batches: TrainBatches) -> float:
        firsts = torch.cat([batches.batch(step)[0][:, 0] for step in range(40)])  # 2,000 samples = 2 blocks
        return float((firsts == 1).float().mean())

    assert share_of_small(natural) == pytest.approx(0.2, abs=0.01)  # in proportion to size
    assert share_of_small(upsampled) == pytest.approx(0.5, abs=0.01)  # 4 x 1,000 vs 1 x 4,000


def test_weighted_mixing_covers_each_source_without_repeats_within_an_epoch():
    a = np.arange(1001, dtype=np.uint16)  # 100 windows, each window's first token is unique
    b = np.arange(2001, dtype=np.uint16) + 5000
    batches = TrainBatches([(a, 1.0), (b, 1.0)], seq_len=10, micro_batch=10, rank=0, world=1, seed=3)
    starts = torch.cat([batches.batch(step)[0][:, 0] for step in range(30)]).tolist()  # 300 samples = one epoch of each
    from_a = [s for s in starts if s < 5000]
    assert len(from_a) == 100 and len(set(from_a)) == 100  # every window of a exactly once
    again = TrainBatches([(a, 1.0), (b, 1.0)], seq_len=10, micro_batch=10, rank=0, world=1, seed=3)
    assert torch.equal(again.batch(17)[0], batches.batch(17)[0])


def test_corrupted_shard_is_refused_and_good_ones_are_hashed_once(tmp_path, monkeypatch):
    from opt import storage
    from opt.data.loader import open_tokens
    from opt.data.manifest import DatasetManifest

    shard = tmp_path / "ds" / "train" / "a.bin"
    shard.parent.mkdir(parents=True)
    np.arange(100, dtype=np.uint16).tofile(shard)
    meta = {"size": shard.stat().st_size, "sha256": storage.sha256_file(shard)}
    manifest = DatasetManifest("id", str(tmp_path / "ds"), 10, 512, "", [], {}, {"train/a.bin": meta}, {})
    cache = tmp_path / "cache"
    assert open_tokens(manifest, "train/a.bin", cache)[5] == 5
    calls = []
    monkeypatch.setattr(storage, "sha256_file", lambda p: calls.append(p) or meta["sha256"])
    open_tokens(manifest, "train/a.bin", cache)
    assert calls == []  # verified before: not hashed again
    monkeypatch.undo()
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # same size, different bytes (and a new mtime)
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupted"):
        open_tokens(manifest, "train/a.bin", cache)
