"""The `schedule` section: cadences are checked when the config loads, with the field named; segment arithmetic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from opt.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["schedule.pipeline.interval_s=60"], "every 60 s"),  # an interval replaces the default cron
        (
            ['schedule.pipeline.cron="*/15 * * * mon-fri"', "schedule.pipeline.timezone=Europe/Paris"],
            "cron '*/15 * * * mon-fri' (Europe/Paris)",
        ),
        (["schedule.data_refresh.active=false"], None),
    ],
)
def test_cadences_load(overrides, expected):
    cfg = load_config(None, overrides)
    if expected:
        assert cfg.schedule.pipeline.describe() == expected
    else:
        assert cfg.schedule.data_refresh.describe() == "cron '0 1 * * *' (UTC), paused"  # the default time, paused


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("schedule.pipeline.cron=0 2 * *", "is not a cron line"),
        ("schedule.pipeline.cron=every night", "is not a cron line"),
        ("schedule.pipeline.timezone=Mars/Olympus", "is not an IANA time zone"),
        ("schedule.checkpoint_eval={cron: '0 * * * *', interval_s: 60}", "exactly one of cron or interval_s"),
        ("schedule.collision=drop", "schedule.collision"),
    ],
)
def test_bad_cadences_are_refused_naming_the_field(override, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, [override])


def test_a_bad_cadence_is_one_line_on_the_command_line():
    out = subprocess.run([str(Path(sys.executable).parent / "optctl"), "config", "show", "--set", "schedule.pipeline.cron=nightly"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "schedule.pipeline.cron" in out.stderr and "Traceback" not in out.stderr


def test_a_segment_stops_early_but_keeps_the_runs_length():
    cfg = load_config(None, ["train.max_steps=100", "train.stop_at_step=30"])
    assert cfg.train.end_step == 30 and cfg.train.max_steps == 100
    assert load_config(None, ["train.max_steps=100", "train.stop_at_step=300"]).train.end_step == 100
    assert load_config(None, ["train.max_steps=100"]).train.end_step == 100


def test_every_scheduled_deployment_is_declared_once():
    from flows.deployments import planned

    names = [p.name for p in planned(load_config(None, ["train.run=nightly", "registry.model_name=opt-x"]))]
    assert names == ["pipeline-nightly", "checkpoint-eval-nightly", "data-refresh", "access-housekeeping", "review-opt-x"]
