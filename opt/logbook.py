"""The run logbook: an append-only `logbook.jsonl` beside the checkpoints, one JSON event per line.

OPT-175B's logbook was written by hand; ours is written by the trainer, the driver and people
(`optctl logbook note`). Events are never rewritten.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from opt import storage

LOGBOOK_FILE = "logbook.jsonl"


class Logbook:
    def __init__(self, run_uri: str) -> None:
        self.uri = storage.join(run_uri, LOGBOOK_FILE)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, "host": socket.gethostname(), **fields}
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


def render_markdown(run: str, events: list[dict[str, Any]]) -> str:
    """A Markdown timeline of a run's logbook."""
    lines = [f"# Logbook: {run}", "", "| time (UTC) | event | details |", "|---|---|---|"]
    for e in events:
        details = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("ts", "event", "host"))
        lines.append(f"| {e['ts']} | {e['event']} | {details} |")
    return "\n".join(lines) + "\n"
