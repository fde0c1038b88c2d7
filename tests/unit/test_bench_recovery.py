"""The recovery bench's account of a goodput run: steps per kill interval and the steady rate between restarts."""

from __future__ import annotations

import math

import pytest

from tests.conftest import load_bench


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    return load_bench("recovery")


def checkpoints(start: float, until: float, rate: float, every: int, stalls: dict[float, float]) -> list[dict]:
    """Checkpoint events of a run at `rate` steps/s, one each `every` steps; `stalls` maps a time to a
    restart of that many seconds that also loses the steps since the last checkpoint."""
    out, t, step, since = [], start, 0, 0
    pending = sorted(stalls.items())
    while t < until:
        if pending and t >= start + pending[0][0]:
            t += pending.pop(0)[1]
            step -= since  # recomputed
            since = 0
        t += 1 / rate
        step += 1
        since += 1
        if step % every == 0:
            out.append({"event": "checkpoint", "t": t, "step": step})
            since = 0
    return out


def test_intervals_separate_restarts_from_the_steady_rate(bench):  # type: ignore[no-untyped-def]
    evs = checkpoints(1000.0, 1240.0, rate=10.0, every=20, stalls={125.0: 8.0})
    (first, steady1), (second, steady2) = bench.intervals(evs, 1000.0, 240.0, 120.0)
    assert first == pytest.approx(1200, abs=20)
    assert second == pytest.approx(1200 - 80 - 50, abs=30)  # 8 s of restart and up to 2 s of recompute
    assert steady1 == pytest.approx(10.0, rel=0.01) and steady2 == pytest.approx(10.0, rel=0.01)


def test_an_interval_without_two_checkpoints_has_no_steady_rate(bench):  # type: ignore[no-untyped-def]
    evs = [{"event": "checkpoint", "t": 1100.0, "step": 40}]
    [(steps, rate)] = bench.intervals(evs, 1000.0, 120.0, 120.0)
    assert steps == 40 and math.isnan(rate)
