"""The training driver's progress line: step, loss, throughput and an ETA, every `interval_s`, from the metrics sink.

Rank 0 hands its metrics to the sink actor on the head node (opt/train/metrics_sink.py); this thread of the
driver asks it for the newest step, so progress reaches the terminal without Ray forwarding the workers' output.
The ETA is the remaining steps at the step rate this driver has seen (restarts included).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("opt.train.progress")


def eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def line(run: str, latest: dict[str, Any], max_steps: int, rate: float | None) -> str:
    step = int(latest["step"])
    parts = [f"{run}: step {step}/{max_steps} ({100 * step / max_steps:.0f}%)"]
    if "loss" in latest:
        parts.append(f"loss {latest['loss']:.4f}")
    if "tokens_per_s" in latest:
        parts.append(f"{latest['tokens_per_s']:,.0f} tok/s")
    if rate and step < max_steps:
        parts.append(f"ETA {eta((max_steps - step) / rate)}")
    return " · ".join(parts)


class Progress:
    """Prints a progress line when the step moved, at most every `interval_s`; `stop()` ends it."""

    def __init__(self, sink: Any, run: str, max_steps: int, interval_s: float = 5.0) -> None:
        self.sink, self.run, self.max_steps, self.interval_s = sink, run, max_steps, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="train-progress", daemon=True)

    def start(self) -> Progress:
        self._thread.start()
        return self

    def _loop(self) -> None:
        import ray

        first: tuple[float, int] | None = None
        shown = -1
        while not self._stop.wait(self.interval_s):
            try:
                latest = ray.get(self.sink.progress.remote(), timeout=5)
            except Exception:  # the sink is busy or gone: progress is best effort
                continue
            if "step" not in latest or latest["step"] == shown:
                continue
            now, step = time.monotonic(), int(latest["step"])
            first = first or (now, step)
            rate = (step - first[1]) / (now - first[0]) if now > first[0] and step > first[1] else None
            log.info("%s", line(self.run, latest, self.max_steps, rate))
            shown = step

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
