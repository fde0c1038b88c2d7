"""optctl as a user meets it: one-line errors, never a traceback, and the planning command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opt.cli import main
from tests.conftest import REPO


def run_optctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "opt.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_invalid_config_is_one_line_naming_the_field():
    r = run_optctl("train", "--set", "train.max_steps=-1")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: defaults: train.max_steps: Input should be greater than or equal to 1 (got -1)"


def test_missing_config_file_and_unknown_key(tmp_path):
    r = run_optctl("data", "prep", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "no such config file" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stpes: 3\n")
    r = run_optctl("train", "--config", str(bad))
    assert r.returncode == 2 and "train.max_stpes: Extra inputs are not permitted" in r.stderr


def test_stage_without_its_input_says_what_to_run_first(tmp_path, capsys):
    code = main(["eval", "--set", f"storage.root={tmp_path}", "--run", "never-trained"])
    assert code == 2
    assert "optctl train" in capsys.readouterr().err


def test_model_info_175b(capsys):
    assert main(["model", "info", "175b", "--gpus", "992", "--tp", "8"]) == 0
    out = capsys.readouterr().out
    assert "96 layers" in out and "TP 8 x DP 124" in out
    params = int(next(line for line in out.splitlines() if line.startswith("parameters")).split()[1].replace(",", ""))
    assert 174e9 < params < 176e9


def test_importing_the_library_and_cli_loads_no_heavy_library():
    code = (
        "import sys, opt, opt.config, opt.storage, opt.cli, opt.access, opt.stages, opt.data.prep; "
        "opt.cli.build_parser(); "
        "heavy = [m for m in ('torch', 'ray', 'mlflow', 'prefect', 'boto3', 'transformers', 'fastapi', 'uvicorn', 'sqlalchemy', 'httpx', "
        "'cryptography', 'alembic') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_plan_175b_prints_a_table_or_with_json_one_object(capsys):
    args = ["plan", "--config", str(REPO / "configs" / "opt-125m.yaml"), "--set", "model.preset=175b", "--trials", "100"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("OPT-175b") and any("Daly interval" in line for line in out) and not out[-1].startswith("{")
    assert main([*args, "--json"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(line)
    assert 600 <= figures["recommended_interval_s"] <= 3 * 3600
    assert figures["recommended_steps"] >= 1 and figures["hosts"] == 124


def test_plan_bad_failure_rate_is_one_line_error(capsys):
    assert main(["plan", "--config", str(REPO / "configs" / "opt-125m.yaml"), "--failures-per-day", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "host_failures_per_day" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["access", "approve", "3", "--quota", "1e20"], ["access", "approve", "x"], ["bogus"]])
def test_a_malformed_command_line_gets_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: optctl")
    assert "--help" in err and "Traceback" not in err
