"""Shared fixtures. Services are started once per session: one Ray instance, one Prefect test API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# No network here: keep Prefect and Ray from phoning home, and give Prefect's first start time.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "python-docs.jsonl"


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    """Write JSONL; a str record is written verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (2 CPUs: this machine's size)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
