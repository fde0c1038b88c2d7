"""The CPU training benchmark stays runnable and compares like with like (its --quick smoke run)."""

from __future__ import annotations

import pytest

from tests import numerics
from tests.conftest import load_bench


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    return load_bench("cpu_train_throughput")


def test_quick_run_reports_both_models_on_the_same_weights(bench, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import torch

    threads = torch.get_num_threads()
    try:
        out = bench.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # the bench sets the process's threads; later tests keep theirs
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith('{"bench": "cpu_train_throughput"')
    # same weights: the peer's logits and loss equal ours within fp32 roundoff, so the two step times measure the same work
    assert out["max_abs_logit_diff"] <= numerics.REL * out["max_abs_logit"] and out["loss_abs_diff"] <= numerics.REL * out["loss"]
    assert out["ours_tokens_per_s"] > 0 and out["peer_tokens_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["ours_tokens_per_s"] / out["peer_tokens_per_s"], rel=1e-2)
    assert out["ratio_vs_peer_fused"] == pytest.approx(out["ours_tokens_per_s"] / out["peer_fused_tokens_per_s"], rel=1e-2)
    # the trainer's optimizer, not a bench-only one; the peer with torch's default and with the same fused AdamW
    assert out["adamw"] == {"ours": "fused", "peer": "default", "peer_fused": "fused"}


def test_shifted_targets_predict_the_next_token_and_ignore_the_last(bench) -> None:  # type: ignore[no-untyped-def]
    import torch

    x = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert bench.shifted_targets(x).tolist() == [[6, 7, -100], [9, 10, -100]]
