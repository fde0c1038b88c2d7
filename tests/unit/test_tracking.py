"""The metrics buffer: a tracking outage never blocks training and loses no point.

The MLflow client is replaced by a hand-written fake here: an outage of a real tracking server
cannot be staged within a unit test's time (MLflow's HTTP client retries for minutes); the real
MLflow path is covered end to end in tests/integration/test_pipeline.py.
"""

from __future__ import annotations

import threading

from opt.tracking import MetricsBuffer


class FlakyClient:
    """Fails the first `failures` calls (an unreachable server), then records what it receives."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[str, float, int]] = []
        self.threads: set[str] = set()

    def log_batch(self, run_id: str, metrics: list) -> None:
        self.threads.add(threading.current_thread().name)
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("tracking server unreachable")
        self.received += [(m.key, m.value, m.step) for m in metrics]


def test_outage_blocks_nothing_and_every_point_arrives_in_order():
    fake = FlakyClient(failures=3)
    buf = MetricsBuffer("http://unreachable", "run", interval_s=0.01, client_factory=lambda: fake)
    for step in range(1, 101):
        buf.log({"loss": 10.0 / step, "lr": 1e-3}, step)
    # the training thread only queued: every send so far came from the buffer's own thread
    assert threading.current_thread().name not in fake.threads
    assert buf.close(timeout_s=30)
    assert [s for k, _, s in fake.received if k == "loss"] == list(range(1, 101))
    assert len(fake.received) == 200 and buf.failures >= 1


def test_points_left_at_close_are_spilled_and_replayed_by_the_next_buffer(tmp_path):
    spill = tmp_path / "pending.json"
    down = FlakyClient(failures=10**9)
    buf = MetricsBuffer("http://unreachable", "run", spill_path=spill, interval_s=0.01, client_factory=lambda: down)
    buf.log({"loss": 1.5}, 7)
    buf.log({"loss": 1.25}, 8)
    assert not buf.close(timeout_s=0.2)
    assert spill.is_file()
    up = FlakyClient(failures=0)
    again = MetricsBuffer("http://back", "run", spill_path=spill, interval_s=0.01, client_factory=lambda: up)
    again.log({"loss": 1.0}, 9)
    assert again.close(timeout_s=10)
    assert up.received == [("loss", 1.5, 7), ("loss", 1.25, 8), ("loss", 1.0, 9)]
    assert not spill.exists()
