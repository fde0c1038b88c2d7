"""bench/near_dup.py runs on both planted sets and compares like with like: at our bands, datasketch's candidates
decided by exact Jaccard of shingle strings keep the same survivors as ours (64-bit shingle hashes)."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench


@pytest.mark.parametrize("corpus", ["sample", "heldout"])
def test_quick_run_ours_decides_like_the_exact_peer(corpus: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = load_bench("near_dup").main(["--mb", "1.5", "--corpus", corpus, "--repeat", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and lines[-1].startswith('{"corpus": "' + corpus)
    assert out["same_survivors_as_exact_peer"]
    assert out["ours_recall_j96"] == 1.0 and out["ours_merged_below_094"] == 0
    assert out["ours_s"] > 0 and out["time_vs_estimate_7x18"] > 0 and out["speedup_vs_datasketch_our_bands"] > 0
