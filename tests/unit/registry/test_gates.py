"""The gate: named checks with verdict, value, threshold and reason; regression against the champion; integrity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opt.config import GateConfig
from opt.registry.gates import Champion, check_all, integrity_checks, passed_all, reasons_of

TASKS = {"pydocs_choice": {"acc": 0.60, "acc_norm_tokens": 0.58, "n": 200.0}, "pydocs_cloze": {"acc": 0.30, "n": 200.0}}
CHAMP = Champion("3", perplexity=20.0, tasks={"pydocs_choice": {"acc": 0.55, "acc_norm_tokens": 0.55, "n": 200.0},
                                               "pydocs_cloze": {"acc": 0.28, "n": 200.0}})  # fmt: skip
WANTED = ["pydocs_choice", "pydocs_cloze"]


def test_a_better_model_passes_every_check() -> None:
    checks = check_all(GateConfig(max_perplexity=100, min_scores={"pydocs_choice.acc": 0.5}), 19.0, TASKS, WANTED, CHAMP, [])
    assert passed_all(checks), [c.reason for c in checks if not c.passed]
    assert {c.name for c in checks} >= {"perplexity", "completeness", "task:pydocs_choice.acc", "regression:perplexity",
                                         "regression:pydocs_choice.acc", "regression:pydocs_cloze.acc"}  # fmt: skip
    assert all(c.reason and c.threshold is not None for c in checks if c.name.startswith("regression:"))


def test_a_worse_model_fails_the_regression_check_naming_the_task_and_the_champion() -> None:
    worse = {**TASKS, "pydocs_choice": {"acc": 0.40, "acc_norm_tokens": 0.41, "n": 200.0}}
    checks = check_all(GateConfig(max_perplexity=100), 19.0, worse, WANTED, CHAMP, [])
    failed = [c for c in checks if not c.passed]
    assert [c.name for c in failed] == ["regression:pydocs_choice.acc", "regression:pydocs_choice.acc_norm_tokens"]
    assert "champion v3's 0.5500" in failed[0].reason and failed[0].value == 0.4
    assert reasons_of(checks)[0] == failed[0].reason  # failed first: what a reviewer reads


def test_noise_within_the_standard_error_does_not_fail_a_model() -> None:
    # 0.53 against 0.55 on 200 questions: 0.4 standard errors of the difference, not a regression
    close = {**TASKS, "pydocs_choice": {"acc": 0.53, "acc_norm_tokens": 0.55, "n": 200.0}}
    assert passed_all(check_all(GateConfig(max_perplexity=100), 19.0, close, WANTED, CHAMP, []))


def test_perplexity_regression_missing_tasks_and_minimum_scores_fail() -> None:
    gate = GateConfig(max_perplexity=100, min_scores={"pydocs_cloze.acc": 0.5})
    checks = check_all(gate, 25.0, {"pydocs_choice": TASKS["pydocs_choice"]}, WANTED, CHAMP, [])
    failed = {c.name: c.reason for c in checks if not c.passed}
    assert "1.05 x champion v3's 20.00" in failed["regression:perplexity"]
    assert failed["completeness"] == "not evaluated: pydocs_cloze"
    assert "pydocs_cloze.acc missing" in failed["task:pydocs_cloze.acc"]
    assert "regression:pydocs_cloze" in failed


def test_integrity_catches_a_corrupted_checkpoint_and_dataset_file(tmp_path: Path) -> None:
    import hashlib

    import torch

    from opt.model import OPT, OPTConfig
    from opt.model.checkpoint import save_consolidated
    from opt.model.hf import export_hf
    from opt.train.checkpoint import CommittedCheckpoint

    cfg = OPTConfig.preset("debug")
    torch.manual_seed(0)
    export = tmp_path / "export"
    export_hf(save_consolidated(cfg, OPT(cfg).state_dict(), export / "consolidated"), export / "hf")
    ckpt_dir = tmp_path / "runs" / "r" / "step-4"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "__0_0.distcp").write_bytes(b"shard bytes")
    digest = hashlib.sha256(b"shard bytes").hexdigest()
    (ckpt_dir / "COMMIT.json").write_text(json.dumps({"step": 4, "files": {"__0_0.distcp": {"size": 11, "sha256": digest}}}))
    data = tmp_path / "dataset"
    (data / "valid").mkdir(parents=True)
    (data / "valid" / "a.bin").write_bytes(b"tokens")

    class Manifest:  # the two things integrity reads of a DatasetManifest
        files = {"valid/a.bin": {"size": 6, "sha256": hashlib.sha256(b"tokens").hexdigest()}, "train/a.bin": {"size": 1, "sha256": "x"}}

        def file_uri(self, rel: str) -> str:
            return str(data / rel)

    ckpt = CommittedCheckpoint(4, str(ckpt_dir), {"__0_0.distcp": {}})
    good = integrity_checks(ckpt, Manifest(), export, tmp_path / "cache")
    assert passed_all(good), [c.reason for c in good]
    assert [c.name for c in good] == ["integrity:checkpoint", "integrity:dataset", "integrity:hf-export"]
    (ckpt_dir / "__0_0.distcp").write_bytes(b"shard BYTES")
    (data / "valid" / "a.bin").write_bytes(b"tokenz")
    bad = {c.name: c for c in integrity_checks(ckpt, Manifest(), export, tmp_path / "cache")}
    assert not bad["integrity:checkpoint"].passed and "differs from the commit marker" in bad["integrity:checkpoint"].reason
    assert not bad["integrity:dataset"].passed and "valid/a.bin" in bad["integrity:dataset"].reason
    assert bad["integrity:hf-export"].passed


@pytest.mark.parametrize("field, value", [("max_perplexity_ratio", 0.9), ("stderr_multiple", -1)])
def test_gate_settings_are_validated(field: str, value: float) -> None:
    with pytest.raises(ValueError):
        GateConfig(**{field: value})
