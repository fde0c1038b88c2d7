"""Reddit's two-phase units: partition each dump by thread, then clean one bucket of threads at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opt.data.units import Unit
from opt.data.workdir import WorkDir


def part_root(work: WorkDir, source: str) -> Path:
    return work.root / "reddit" / source


def partition_unit(work_root: str, unit: Unit, buckets: int) -> dict[str, Any]:
    """Phase 1 for one dump file; its bad records go to the part's `rejected.jsonl` (quarantined later)."""
    from opt.data.reddit import partition_reddit_file

    work = WorkDir(Path(work_root))
    done = work.is_done("reddit-partition", unit.id)
    if done is not None:
        return done["result"]
    (uri,) = unit.inputs
    out_dir = part_root(work, unit.source)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = partition_reddit_file(unit.source, uri, out_dir, buckets)
    part = Path(summary["part"]) if "part" in summary else Path(summary["rejected_file"]).parent
    outputs = sorted(p for p in part.iterdir() if p.is_file())
    result = {
        "docs_in": int(summary.get("rejected", 0)),
        "dropped": dict(summary.get("rejected_by_reason", {})),
        "rejected_file": str(Path(summary["rejected_file"]).relative_to(work.root)),
        "part": str(part.relative_to(work.root)),
    }
    work.mark_done("reddit-partition", unit.id, outputs, result)
    return result


def bucket_units(work: WorkDir, source: str, parts: list[str], buckets: int) -> list[Unit]:
    """One clean unit per bucket, reading that bucket's files from every part (dump file) of the source."""
    from opt.data.reddit import bucket_files

    units = []
    part_paths = [work.root / p for p in parts]
    for b in range(buckets):
        files = bucket_files(part_paths, b)
        if files:
            units.append(
                Unit(f"{source}.b{b:05d}", source, "reddit-bucket", tuple(str(f) for f in files), sum(f.stat().st_size for f in files))
            )
    return units
