"""bench/eval_throughput.py runs and compares the same work: the two sides' log-likelihoods agree."""

from __future__ import annotations

import torch

from tests.conftest import load_bench


def test_quick_run_scores_the_same_requests_on_both_sides(capsys) -> None:  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    try:
        out = load_bench("eval_throughput").main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"bench": "eval_throughput"')
    assert out["greedy_equal"] and out["max_abs_loglik_diff"] <= 1e-4
    assert out["ours_tokens_per_s"] > 0 and out["peer_tokens_per_s"] > 0 and out["request_tokens"] > out["requests"]
