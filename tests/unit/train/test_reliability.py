"""Checkpoint interval and goodput under failures: closed forms, the simulator, and the OPT-175B plan."""

from __future__ import annotations

import math

import pytest

from opt.config import load_config
from opt.train.reliability import (
    DAY_S,
    expected_goodput,
    format_plan,
    plan_for,
    simulate,
    young_daly_interval,
    young_interval,
)
from tests.conftest import REPO


def test_young_and_daly_intervals_match_hand_computed_values():
    # delta=50, M=10000: sqrt(2*50*10000) = 1000; delta/2M = 0.0025, sqrt = 0.05
    assert young_interval(50, 10_000) == pytest.approx(1000.0)
    assert young_daly_interval(50, 10_000) == pytest.approx(1000 * (1 + 0.05 / 3 + 0.0025 / 9) - 50)  # 966.944
    assert young_daly_interval(50, 10_000) == pytest.approx(966.9444, abs=1e-3)
    # a checkpoint as slow as 2M or more: checkpoint every M
    assert young_daly_interval(300, 100) == 100
    assert young_daly_interval(200, 100) == 100


@pytest.mark.parametrize(("delta", "restart", "mtbf"), [(50, 0, 10_000), (20, 600, 43_200), (600, 300, 5_000)])
def test_daly_interval_maximises_goodput(delta, restart, mtbf):
    tau = young_daly_interval(delta, mtbf)
    best = expected_goodput(tau, delta, restart, mtbf)
    assert 0 < best < 1
    assert expected_goodput(0.5 * tau, delta, restart, mtbf) < best
    assert expected_goodput(2 * tau, delta, restart, mtbf) < best


def test_goodput_without_failures_is_the_checkpoint_overhead():
    # M -> infinity: tau / (tau + delta)
    assert expected_goodput(900, 100, 600, 1e12) == pytest.approx(0.9, rel=1e-6)


@pytest.mark.parametrize(
    ("interval", "delta", "restart", "mtbf"),
    [(1300, 20, 600, 43_200), (966.9, 50, 0, 10_000), (3600, 300, 600, 20_000), (7200, 60, 1800, 10_000)],
)
def test_simulation_agrees_with_closed_form(interval, delta, restart, mtbf):
    sim = simulate(interval, delta, restart, mtbf, work_s=60 * DAY_S, trials=500, seed=1)
    closed = expected_goodput(interval, delta, restart, mtbf)
    assert sim.goodput_mean == pytest.approx(closed, rel=0.02)
    assert sim.goodput_lo <= sim.goodput_mean <= sim.goodput_hi
    # failures arrive at rate 1/M over the whole wall time
    assert sim.failures_mean == pytest.approx(sim.wall_s_mean / mtbf, rel=0.05)


def test_simulation_is_deterministic_and_fast_enough_for_a_two_month_job():
    a = simulate(1300, 20, 600, 43_200, work_s=60 * DAY_S, trials=1000, seed=7)
    b = simulate(1300, 20, 600, 43_200, work_s=60 * DAY_S, trials=1000, seed=7)
    assert a == b and a.trials == 1000


def test_opt_175b_plan():
    cfg = load_config(REPO / "configs" / "opt-125m.yaml", ["model.preset=175b"])
    plan = plan_for(cfg, trials=200)
    assert 174e9 < plan.params < 176e9
    assert plan.mtbf_s == pytest.approx(DAY_S / 2)  # 2 failures a day across 124 hosts
    assert 10 * 60 <= plan.recommended_interval_s <= 3 * 3600
    assert plan.recommended_steps == max(1, round(plan.recommended_interval_s / plan.step_s))
    assert plan.checkpoint_estimated and plan.checkpoint_s > 0
    assert plan.train_compute_s == pytest.approx(cfg.train.max_steps * plan.step_s)
    # a far-too-rare interval (10x Daly's) does worse, in closed form and in simulation
    rare = 10 * plan.recommended_steps * plan.step_s
    assert plan.goodput_recommended >= expected_goodput(rare, plan.checkpoint_s, plan.restart_s, plan.mtbf_s)
    rare_sim = simulate(rare, plan.checkpoint_s, plan.restart_s, plan.mtbf_s, plan.train_compute_s, 200, 0)
    assert plan.sim_recommended.goodput_mean >= rare_sim.goodput_mean
    assert plan.goodput_recommended >= plan.goodput_current
    text = format_plan(plan)
    assert "OPT-175b" in text and f"checkpoint_every {plan.recommended_steps:,} steps" in text


def test_plan_scales_with_hosts_and_takes_a_given_checkpoint_time():
    cfg = load_config(None, [])
    plan = plan_for(cfg, hosts=10, host_failures_per_day=0.1, checkpoint_s=30, trials=50)
    assert plan.mtbf_s == pytest.approx(DAY_S)
    assert plan.checkpoint_s == 30 and not plan.checkpoint_estimated
    assert plan.recommended_interval_s == pytest.approx(young_daly_interval(30, DAY_S))
    assert math.isfinite(plan.to_dict()["wall_s_recommended"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: young_interval(0, 100), "checkpoint_s"),
        (lambda: young_daly_interval(10, -1), "mtbf_s"),
        (lambda: expected_goodput(100, 10, -1, 1000), "restart_s"),
        (lambda: expected_goodput(0, 10, 0, 1000), "interval_s"),
        (lambda: simulate(100, 10, 0, 1000, work_s=0), "work_s"),
        (lambda: simulate(100, 10, 0, float("nan"), work_s=1e4), "mtbf_s"),
        (lambda: simulate(100, 10, 0, 1000, work_s=1e4, trials=0), "trials"),
        (lambda: plan_for(load_config(None, []), hosts=0), "hosts"),
        (lambda: plan_for(load_config(None, []), host_failures_per_day=0), "host_failures_per_day"),
        (lambda: plan_for(load_config(None, []), mfu=1.5), "mfu"),
        (lambda: plan_for(load_config(None, []), checkpoint_s=-5), "checkpoint_s"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
