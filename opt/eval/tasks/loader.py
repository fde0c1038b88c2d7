"""The bundled tasks' data: JSON lines beside this file, loaded without the network (lm-eval's `custom_dataset`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    import datasets

    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def cloze(**_: Any) -> Any:
    return _load("pydocs_cloze")


def choice(**_: Any) -> Any:
    return _load("pydocs_choice")


def story(**_: Any) -> Any:
    return _load("pydocs_story")
