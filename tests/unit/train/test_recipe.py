"""OPT's recipe per preset and gradient accumulation to reach the batch size in tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opt.data.loader import TrainBatches
from opt.model import OPT, OPTConfig
from opt.train.loop import accumulate_gradients
from opt.train.recipe import OPT_RECIPES, RecipeError, resolve
from tests import numerics


@pytest.mark.parametrize(
    ("preset", "lr", "batch_tokens"),
    [("125m", 6.0e-4, 500_000), ("350m", 3.0e-4, 500_000), ("1.3b", 2.0e-4, 1_000_000), ("2.7b", 1.6e-4, 1_000_000),
     ("6.7b", 1.2e-4, 2_000_000), ("13b", 1.0e-4, 4_000_000), ("30b", 1.0e-4, 4_000_000), ("66b", 0.8e-4, 2_000_000),
     ("175b", 1.2e-4, 2_000_000)],
)  # fmt: skip
def test_paper_table(preset, lr, batch_tokens):
    assert OPT_RECIPES[preset] == (lr, batch_tokens)
    assert resolve(preset, 2048, 8, 4, 1000).lr == lr


def test_accumulation_and_warmup_follow_the_batch_in_tokens():
    # 125M on 8 ranks, micro-batch 4 x 2048: 65,536 tokens per micro-step; 8 micro-steps make 2^19 ~ 0.5M
    r = resolve("125m", 2048, 8, 4, 100_000, batch_tokens=524_288)
    assert (r.grad_accum, r.batch_tokens) == (8, 524_288)
    assert r.warmup_steps == 716  # 375M tokens / 524,288 per step, rounded up
    assert resolve("175b", 2048, 1024, 1, 100_000, batch_tokens=2048 * 1024).warmup_steps == 2000
    debug = resolve("debug", 128, 2, 8, 40)
    assert (debug.lr, debug.warmup_steps, debug.grad_accum) == (1e-3, 4, 1)
    explicit = resolve("125m", 2048, 8, 4, 1000, lr=3e-4, warmup_steps=10)
    assert (explicit.lr, explicit.warmup_steps) == (3e-4, 10)


def test_unreachable_batch_size_names_the_numbers():
    with pytest.raises(RecipeError, match=r"4 x 2048 x 8 = 65536; use e.g. 524288"):
        resolve("125m", 2048, 8, 4, 1000, batch_tokens=500_000)


def test_two_accumulated_micro_batches_equal_one_batch_of_twice_the_size():
    cfg = OPTConfig.preset("debug", vocab_size=64, max_seq_len=16)
    tokens = np.random.default_rng(0).integers(0, 64, size=4000).astype(np.uint16)
    torch.manual_seed(0)
    one = OPT(cfg)
    two = OPT(cfg)
    two.load_state_dict(one.state_dict())
    loss_one = accumulate_gradients(one, TrainBatches(tokens, 16, 8, 0, 1, seed=1), data_step=3, grad_accum=1, device="cpu")
    loss_two = accumulate_gradients(two, TrainBatches(tokens, 16, 4, 0, 1, seed=1), data_step=3, grad_accum=2, device="cpu")
    # the same sums in another order: within fp32 roundoff of each tensor's scale (tests/numerics.py)
    numerics.assert_within(numerics.roundoff_usage({"loss": loss_two}, {"loss": loss_one}), "accumulated loss")
    grads = {name: p.grad for name, p in one.named_parameters()}
    numerics.assert_within(numerics.roundoff_usage({n: p.grad for n, p in two.named_parameters()}, grads), "accumulated gradients")
