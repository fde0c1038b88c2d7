"""The first hour's stops through the real CLI: every bad name or path is one line with exit 2, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def optctl(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"OPT_HOME": str(home)} if home else {})}
    return subprocess.run([sys.executable, "-m", "opt.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr.strip()


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["model", "export", "--run", "tiny", "/proc/x"], "OUT /proc/x: cannot write under /proc"),
        (["model", "export", "--run", "tiny", "tiny.pt"], "an export is a folder (config.json + model.safetensors), not one file"),
        (["model", "export-hf", "src", "/proc/x"], "DST /proc/x: cannot write under /proc"),
        (["model", "import-hf", "src", "README.md/out"], "README.md is a file, so no folder can be made under it"),
        (["data", "prep", "--out", "/proc/x"], "--out /proc/x: cannot write under /proc"),
        (["data", "prep", "--out", "README.md/out"], "--out README.md/out: README.md is a file"),
        (["access", "download", "m", "1", "--out", "/proc/x"], "--out /proc/x: cannot write under /proc"),
        (["eval", "tasks", "--checkpoint", "c", "--tasks", "pydocs_choice", "--out", "/proc/x/r.json"], "--out /proc/x"),
        (["eval", "tasks", "--checkpoint", "c", "--tasks", "pydocs_choice", "--out", "configs"], "--out configs is a folder"),
        (["model", "info", "bogus"], "unknown OPT preset 'bogus'; choose one of debug, 125m"),
    ],
)
def test_an_unwritable_output_or_unknown_name_is_one_line(argv: list[str], says: str) -> None:
    before = tree(REPO / "configs")
    assert says in one_line(optctl(*argv))
    assert tree(REPO / "configs") == before and not (REPO / "tiny.pt").exists()


def test_eval_at_a_missing_step_lists_the_steps_that_exist(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    for step in (20, 40):
        (run / f"step-{step}").mkdir(parents=True)
        (run / f"step-{step}" / "COMMIT.json").write_text(json.dumps({"step": step, "files": {}}))
    (run / "run.json").write_text(json.dumps({"run": "r", "dataset_id": "d", "mlflow_run_id": "x"}))
    line = one_line(optctl("eval", "--set", f"storage.root={tmp_path}", "--run", "r", "--step", "30"))
    assert line == "error: run 'r' has no committed checkpoint at step 30; its committed steps: 20, 40"


def test_a_note_on_an_unknown_run_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    line = one_line(optctl("logbook", "note", "nosuchrun", "hello", "--set", f"storage.root={tmp_path}"))
    assert "no run 'nosuchrun' under" in line and tree(tmp_path) == []
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    r = optctl("logbook", "note", "r", "swapped the PSU", "--author", "alice", "--set", f"storage.root={tmp_path}")
    assert r.returncode == 0 and "by alice" in r.stdout
    (entry,) = [json.loads(line) for line in (run / "logbook.jsonl").read_text().splitlines()]
    assert (entry["event"], entry["text"], entry["author"]) == ("note", "swapped the PSU", "alice")


def test_verbose_is_accepted_anywhere_on_the_line() -> None:
    r = optctl("model", "info", "bogus", "-v")
    assert r.returncode != 0 and "Traceback" in r.stderr  # -v after the subcommand: the full traceback
    assert optctl("model", "info", "debug", "--verbose").returncode == 0


def test_model_info_of_a_small_preset_is_in_readable_units() -> None:
    r = optctl("model", "info", "debug")
    assert r.returncode == 0 and "(141K)" in r.stdout and "0.00B" not in r.stdout


def test_config_keys_lists_every_key_with_type_default_and_meaning_and_show_resolves() -> None:
    r = optctl("config", "keys", "train")
    assert r.returncode == 0
    assert "train.lease_ttl_s  (float, default 120.0)" in r.stdout and "a dead holder's lease is taken over" in r.stdout
    assert all(line.startswith(("train.", "    ")) for line in r.stdout.splitlines())
    assert "registry.gate.max_perplexity  (float" in optctl("config", "keys").stdout
    assert "sections: access, data, eval" in one_line(optctl("config", "keys", "nope"))
    shown = optctl("config", "show", "--config", "configs/tiny.yaml", "--set", "train.max_steps=7")
    assert shown.returncode == 0 and "max_steps: 7" in shown.stdout


def test_export_hf_without_a_tokenizer_says_so(tmp_path: Path) -> None:
    import torch

    from opt.model import OPT, OPTConfig
    from opt.model.checkpoint import save_consolidated

    cfg = OPTConfig.preset("debug")
    torch.manual_seed(0)
    src = save_consolidated(cfg, OPT(cfg).state_dict(), tmp_path / "consolidated")
    r = optctl("model", "export-hf", str(src), str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert "note: no tokenizer in" in r.stdout and "pass --tokenizer" in r.stdout
    assert one_line(optctl("model", "export-hf", str(src), str(tmp_path / "hf2"), "--tokenizer", str(tmp_path / "nope.json"))) == (
        f"error: --tokenizer {tmp_path / 'nope.json'}: no such file; pass the dataset's tokenizer/tokenizer.json"
    )
    assert not (tmp_path / "hf2").exists()
