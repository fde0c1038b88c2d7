"""The run logbook: append-only JSON events, one per line, beside the checkpoints.

OPT-175B's logbook was written by hand; ours is written by the trainer, the driver, Ray Train's
controller and people (`optctl logbook note`), often at the same moment. Events are never rewritten.
On a local or shared filesystem they go to one `logbook.jsonl` with O_APPEND, which keeps concurrent
lines whole. S3 has no append, and a read-modify-write from two processes loses a line, so there each
process writes its own object under `logbook/` (rewritten whole as it grows, by that process only), and
reading merges them by time.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opt import storage

LOGBOOK_FILE = "logbook.jsonl"
SEGMENTS_DIR = "logbook"
"""On S3: one object of events per writing process (`<utc>-<host>-<pid>-<id>.jsonl`)."""


@dataclass
class _Segment:
    """This process's logbook object on S3: only this process writes it."""

    uri: str
    text: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


_segments: dict[tuple[str, int], _Segment] = {}
_segments_lock = threading.Lock()
_read_cache: dict[str, tuple[int, str]] = {}
"""Segments read before, by URI: (size, text). Segments only grow, so an unchanged size is unchanged text."""


def _segment(run_uri: str) -> _Segment:
    key = (run_uri, os.getpid())  # a forked child gets its own object, never its parent's
    with _segments_lock:
        if key not in _segments:
            name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            _segments[key] = _Segment(storage.join(run_uri, SEGMENTS_DIR, f"{name}.jsonl"))
        return _segments[key]


class Logbook:
    def __init__(self, run_uri: str) -> None:
        self.run_uri = run_uri
        self.uri = storage.join(run_uri, LOGBOOK_FILE)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        entry = {"ts": ts, "t": round(now, 3), "event": event, "host": socket.gethostname(), **fields}
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        if storage.is_s3(self.uri):
            seg = _segment(self.run_uri)
            with seg.lock:  # the controller appends from two threads
                storage.write_text(seg.uri, seg.text + line)
                seg.text += line  # only once written: a failed write is not repeated by the next append
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
        """Every event, oldest first."""
        texts = [storage.read_text(self.uri)] if storage.exists(self.uri) else []  # on S3: a logbook from before segments
        if storage.is_s3(self.uri):
            sizes = storage.list_sizes(storage.join(self.run_uri, SEGMENTS_DIR))
            new = [uri for uri, size in sizes.items() if uri not in _read_cache or _read_cache[uri][0] != size]
            if new:  # a run with many restarts has many segments: fetch the new and grown ones side by side
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=min(16, len(new))) as pool:
                    for uri, text in zip(new, pool.map(storage.read_text, new), strict=True):
                        _read_cache[uri] = (len(text.encode("utf-8")), text)
            texts += [_read_cache[uri][1] for uri in sizes]
        events = [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]
        # each writer's events are in order; across writers, by time (a stable sort keeps a writer's ties in order)
        return sorted(events, key=lambda e: e.get("t", 0.0)) if len(texts) > 1 else events


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
