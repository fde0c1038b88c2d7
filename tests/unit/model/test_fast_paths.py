"""The model's CPU fast paths give what the plain torch ops give: the fused tied-head loss and the dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opt.model import OPT, OPTConfig
from opt.model.model import _Dropout
from tests import numerics

CFG = OPTConfig.preset("debug")


def _reference_loss(model: OPT, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(model.hidden(ids), model.embed_tokens.weight)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("ignored", [0, 5], ids=["all-targets", "some-ignored"])
def test_fused_loss_matches_cross_entropy_in_value_and_gradients(ignored: int) -> None:
    torch.manual_seed(0)
    model = OPT(CFG).train()
    ids = torch.randint(3, CFG.vocab_size, (3, 16))
    targets = torch.roll(ids, -1, dims=1)
    targets.view(-1)[:ignored] = -100
    got = model.loss(ids, targets)
    got.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(fused) == len(list(model.parameters()))
    model.zero_grad(set_to_none=True)
    want = _reference_loss(model, ids, targets)
    want.backward()
    # the same sums in other orders: within fp32 roundoff of each tensor's scale (tests/numerics.py)
    numerics.assert_within(numerics.roundoff_usage({"loss": got}, {"loss": want}), "fused loss")
    with torch.no_grad():  # evaluation takes the unfused path: same value
        numerics.assert_within(numerics.roundoff_usage({"loss": model.loss(ids, targets)}, {"loss": want}), "eval loss")
    numerics.assert_within(numerics.roundoff_usage(fused, {n: p.grad for n, p in model.named_parameters()}), "fused loss gradients")


def test_fused_loss_with_every_target_ignored_is_zero_with_zero_gradients() -> None:
    model = OPT(CFG).train()
    ids = torch.randint(3, CFG.vocab_size, (2, 8))
    loss = model.loss(ids, torch.full_like(ids, -100))
    loss.backward()
    assert loss.item() == 0.0  # not NaN: a fully padded micro-batch must not poison the step
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_fused_loss_refuses_a_second_backward_through_the_same_graph() -> None:
    model = OPT(CFG).train()
    ids = torch.randint(3, CFG.vocab_size, (2, 8))
    loss = model.loss(ids, torch.roll(ids, -1, dims=1))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_dropout_drops_p_of_the_values_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = _Dropout(0.1).train()(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002
    assert abs(y.mean().item() - 1.0) < 0.005
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - 6554 / 65536)))  # p is quantised to 1/65536


def test_dropout_is_seeded_by_torch_rng_and_identity_in_eval() -> None:
    x = torch.randn(4, 16, 32)
    d = _Dropout(0.3).train()
    torch.manual_seed(7)
    a = d(x)
    torch.manual_seed(7)
    assert torch.equal(a, d(x))
    assert not torch.equal(a, d(x))
    assert torch.equal(d.eval()(x), x)
    assert torch.equal(_Dropout(0.0).train()(x), x)
