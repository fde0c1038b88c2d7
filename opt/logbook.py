"""The run logbook: an append-only `logbook.jsonl` beside the checkpoints, one JSON event per line.

OPT-175B's logbook was written by hand; ours is written by the trainer, the driver and people
(`optctl logbook note`). Events are never rewritten.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opt import storage

LOGBOOK_FILE = "logbook.jsonl"


class Logbook:
    def __init__(self, run_uri: str) -> None:
        self.uri = storage.join(run_uri, LOGBOOK_FILE)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        entry = {"ts": ts, "t": round(now, 3), "event": event, "host": socket.gethostname(), **fields}
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        if storage.is_s3(self.uri):
            # S3 has no append: rewrite the object with the line added (one writer per run: the driver or rank 0)
            old = storage.read_text(self.uri) if storage.exists(self.uri) else ""
            storage.write_text(self.uri, old + line)
        else:
            path = Path(self.uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND keeps concurrent single-line writes whole
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    def read(self) -> list[dict[str, Any]]:
        if not storage.exists(self.uri):
            return []
        return [json.loads(line) for line in storage.read_text(self.uri).splitlines() if line.strip()]


@dataclass(frozen=True)
class Totals:
    attempts: int
    restarts: int
    failures: int
    hosts_lost: list[str]
    """Hosts of failures where the worker went away with its process or node (not a Python error in a live worker)."""
    downtime_s: float
    """From each failure to the first completed step after the restart."""
    recomputed_s: float
    """Work redone: from the last checkpoint before each failure to the failure."""
    rollbacks: int
    checkpoints: int
    notes: int

    @property
    def time_lost_s(self) -> float:
        return self.downtime_s + self.recomputed_s


def totals(events: list[dict[str, Any]]) -> Totals:
    """What the failures cost, from the timestamps of the events (entries without `t` are skipped)."""
    downtime = recomputed = 0.0
    hosts: list[str] = []
    failed_at: float | None = None  # first failure of the current outage
    last_checkpoint: float | None = None
    for e in events:
        t = e.get("t")
        if e["event"] == "checkpoint":
            last_checkpoint = t
        elif e["event"] == "failure" and t is not None:
            if (e.get("worker_lost") or e.get("node_lost")) and e.get("host") and e["host"] not in hosts:
                hosts.append(e["host"])
            if failed_at is None:
                failed_at = t
                start = max(filter(None, [last_checkpoint, _attempt_start(events, e)]), default=None)
                recomputed += t - start if start is not None else 0.0
        elif e["event"] == "first_step" and failed_at is not None and t is not None:
            downtime += t - failed_at
            failed_at = None
    count = collections.Counter(e["event"] for e in events)
    return Totals(
        attempts=count["workers_started"],
        restarts=count["restart"],
        failures=count["failure"],
        hosts_lost=hosts,
        downtime_s=round(downtime, 1),
        recomputed_s=round(recomputed, 1),
        rollbacks=count["rollback"],
        checkpoints=count["checkpoint"],
        notes=count["note"],
    )


def _attempt_start(events: list[dict[str, Any]], failure: dict[str, Any]) -> float | None:
    """When the failed attempt did its first step (work before that was not new)."""
    starts = [e.get("t") for e in events if e["event"] == "first_step" and e.get("attempt") == failure.get("attempt")]
    return starts[-1] if starts else None


def render_markdown(run: str, events: list[dict[str, Any]]) -> str:
    """The run's logbook as Markdown: totals, then the timeline."""
    s = totals(events)
    lines = [
        f"# Logbook: {run}",
        "",
        f"- restarts: {s.restarts} ({s.failures} failed ranks over {s.attempts} attempts)",
        f"- hosts lost: {len(s.hosts_lost)}" + (f" ({', '.join(s.hosts_lost)})" if s.hosts_lost else ""),
        f"- time lost: {s.time_lost_s:.1f} s (down {s.downtime_s:.1f} s, recomputed {s.recomputed_s:.1f} s)",
        f"- checkpoints: {s.checkpoints}, spike rollbacks: {s.rollbacks}, notes: {s.notes}",
        "",
        "| time (UTC) | event | details |",
        "|---|---|---|",
    ]
    for e in events:
        details = ", ".join(f"{k}={_cell(v)}" for k, v in e.items() if k not in ("ts", "t", "event", "host"))
        lines.append(f"| {e['ts']} | {e['event']} | {details} |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    # a table cell: no newlines, no column separators
    return str(v).replace("\n", " ").replace("|", "\\|")
