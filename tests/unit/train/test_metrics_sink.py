"""Rank 0's metrics go through one sink actor that outlives the attempts; a lost sink drops no point.

The sink is a real Ray actor on the session's Ray instance, and the first test sends to a real MLflow
(SQLite). In the second the fallback buffer's MLflow client is a recording fake: the points that buffer
sends are the thing under test, and its own delivery is covered in tests/unit/test_tracking.py.
"""

from __future__ import annotations

import time

import pytest

from opt.tracking import MetricsBuffer, get_or_create_run
from opt.train.metrics_sink import SinkClient, close_sink, start_sink


class Recorder:
    def __init__(self) -> None:
        self.received: list[tuple[str, float, int]] = []

    def log_batch(self, run_id: str, metrics: list) -> None:
        self.received += [(m.key, m.value, m.step) for m in metrics]


def test_points_reach_mlflow_through_the_sink_once_and_in_order(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = get_or_create_run(uri, "sink", str(tmp_path / "artifacts"), "r", None, tags={})
    sink = start_sink(uri, run_id, tmp_path / "pending.json")
    client = SinkClient(sink, fallback=lambda: pytest.fail("the sink is up: no local buffer"), interval_s=0.05)
    for step in range(1, 61):
        client.log({"loss": 10.0 / step, "lr": 1e-3}, step)
        time.sleep(0.002)
    assert client.close(timeout_s=30) and client.local is None
    assert close_sink(sink)
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 61))
    assert {m.step: m.value for m in history}[4] == pytest.approx(2.5)
    assert not (tmp_path / "pending.json").exists()  # everything was delivered: nothing spilled


def test_a_lost_sink_hands_every_point_it_had_not_taken_to_a_local_buffer(ray_session):
    import ray
    from ray.exceptions import RayActorError

    sink = start_sink("http://127.0.0.1:9", "run", None)  # its own sends never succeed: it is killed first
    fake = Recorder()
    client = SinkClient(
        sink, fallback=lambda: MetricsBuffer("http://local", "run", interval_s=0.01, client_factory=lambda: fake), interval_s=0
    )
    for step in range(1, 11):
        client.log({"loss": 1.0}, step)
    client.confirm(timeout_s=60)  # the sink has taken steps 1-10
    assert client.local is None
    ray.kill(sink)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until Ray reports the actor dead to this process
        try:
            ray.get(sink.log.remote([]), timeout=10)
        except RayActorError:
            break
        time.sleep(0.1)
    for step in range(11, 31):
        client.log({"loss": 0.5}, step)
    assert client.close(timeout_s=30)
    assert client.local is not None  # rank 0 switched to its own buffer
    # steps the sink took are not sent twice; every later one arrives, in order
    assert [s for _, _, s in fake.received] == list(range(11, 31))
