"""Promotion records who, when and why; refuses failed gates without an override; keeps the champion's history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opt.logbook import Logbook
from opt.registry.mlflow_registry import RegistryError, champion_of
from opt.registry.promote import compare, history_of, promote


@pytest.fixture
def registry(tmp_path: Path) -> tuple[str, Path]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    c.create_registered_model("opt-x")
    run = tmp_path / "store" / "runs" / "r"
    for version, (gate, ppl, acc) in enumerate([("passed", 30.0, 0.5), ("passed", 25.0, 0.6), ("failed", 90.0, 0.3)], start=1):
        verdict = "<=" if gate == "passed" else ">"
        tags = {"opt.gate": gate, "opt.gate_reasons": json.dumps([f"validation perplexity {ppl} {verdict} max 50"]),
                "opt.eval_perplexity": str(ppl), "opt.eval_tasks": json.dumps({"pydocs_choice": {"acc": acc, "n": 200.0}}),
                "opt.checkpoint_uri": str(run / f"step-{version}"), "opt.access_class": "open"}  # fmt: skip
        c.create_model_version("opt-x", source=str(tmp_path), tags=tags)
    return uri, run


def test_promotion_is_recorded_and_a_rollback_is_a_promotion(registry) -> None:  # type: ignore[no-untyped-def]
    uri, run = registry
    promote(uri, "opt-x", "1", reason="first release", actor="ana")
    entry = promote(uri, "opt-x", "2", reason="better on every task", actor="ben")
    assert entry["previous"] == "1" and entry["by"] == "ben" and champion_of(uri, "opt-x").version == "2"
    assert champion_of(uri, "opt-x").tasks["pydocs_choice"]["acc"] == 0.6
    promote(uri, "opt-x", "1", reason="roll back: v2 regressed in production", actor="ana")
    assert [(h["version"], h["previous"]) for h in history_of(uri, "opt-x")] == [("1", None), ("2", "1"), ("1", "2")]
    assert [e["version"] for e in Logbook(str(run)).read() if e["event"] == "promoted"] == ["1", "2", "1"]


def test_a_version_that_failed_its_gates_needs_an_override(registry) -> None:  # type: ignore[no-untyped-def]
    uri, _ = registry
    with pytest.raises(RegistryError, match=r"v3 failed its gates \(validation perplexity 90.0 > max 50\).*--override"):
        promote(uri, "opt-x", "3", reason="ship it", actor="eve")
    assert champion_of(uri, "opt-x") is None
    entry = promote(uri, "opt-x", "3", reason="needed for a bias study", override="reviewed by the board, 2026-12-01", actor="eve")
    assert entry["override"] == "reviewed by the board, 2026-12-01"
    with pytest.raises(RegistryError, match="needs --reason"):
        promote(uri, "opt-x", "2", reason=" ", actor="eve")


def test_compare_shows_both_versions_side_by_side(registry) -> None:  # type: ignore[no-untyped-def]
    uri, _ = registry
    rows = {k: (a, b) for k, a, b in compare(uri, "opt-x", "1", "3")}
    assert rows["perplexity"] == ("30.0", "90.0") and rows["gate"] == ("passed", "failed")
    assert rows["pydocs_choice.acc"] == ("0.5", "0.3")
