"""Resumable work: a unit of work is done when its marker exists and every output it lists verifies.

Markers are written last (atomically) with the size and sha256 of each output, so a unit killed
half-way is simply redone, and a finished unit is never redone: a re-run continues where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opt.storage import sha256_file, write_text


class WorkDir:
    """Local scratch space of one dataset build: `<root>/<stage>/...` outputs and `<root>/done/` markers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _marker(self, stage: str, unit: str) -> Path:
        return self.root / "done" / stage / f"{unit}.json"

    def is_done(self, stage: str, unit: str) -> dict[str, Any] | None:
        """The unit's recorded result if it finished and its outputs are intact, else None."""
        marker = self._marker(stage, unit)
        if not marker.is_file():
            return None
        record = json.loads(marker.read_text())
        for rel, meta in record["outputs"].items():
            p = self.root / rel
            if not p.is_file() or p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
                marker.unlink()  # an output changed or vanished since: redo the unit
                return None
        return record

    def mark_done(self, stage: str, unit: str, outputs: list[Path], result: dict[str, Any]) -> dict[str, Any]:
        record = {
            "outputs": {str(p.relative_to(self.root)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in outputs},
            "result": result,
        }
        for p in outputs:  # outputs reach the disk before the marker that vouches for them
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        write_text(str(self._marker(stage, unit)), json.dumps(record, sort_keys=True))
        return record
