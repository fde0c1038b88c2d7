"""Scheduled operation against a real `prefect server start` and a real process worker (tests/prefect_server.py).

`optctl deploy` registers every deployment with its schedule; a short interval schedule makes a flow run that
the worker executes; the pipeline deployment trains a segment, registers, and waits for a reviewer while a second
run of it is held back; the reviewer approves from the command line; the pipeline's MLflow is a real `mlflow
server` over HTTP with a PostgreSQL backend store. The review timeout and the review in the Prefect UI use
versions registered directly (the review flow decides on any version that passed its gates: no training needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import overrides
from tests.prefect_server import wait_for_state, worker

pytestmark = pytest.mark.slow

OPTCTL = str(Path(sys.executable).parent / "optctl")
POOL = "opt-test-pool"
MODEL = "opt-sched"


def _config(root: Path, tracking: str, ray_address: str) -> Path:
    """A config file with every path absolute (the worker runs the flows in another process)."""
    data: dict = {}
    for kv in overrides(root, **{"tracking.uri": tracking, "train.run": "sched", "registry.model_name": MODEL,
                                 "registry.access_class": "open", "train.max_steps": 20}):  # fmt: skip
        key, value = kv.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value.startswith(("[", "{")) or value.isdigit() else value
    data["train"].update({"ray_address": ray_address, "checkpoint_every": 4})
    data["schedule"] = {
        "work_pool": POOL,
        "pipeline": {"cron": "0 3 * * *"},
        "pipeline_steps": 8,
        "retry_delay_s": 1,
        "checkpoint_eval": {"interval_s": 1800, "active": False},
        "data_refresh": {"cron": "0 1 * * *", "timezone": "Europe/Paris"},
        "access_housekeeping": {"interval_s": 5},
        "approval_poll_s": 1,
    }
    path = root / "sched.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, prefect_server, mlflow_server, ray_session):
    root = tmp_path_factory.mktemp("sched")
    address = ray_session.get_runtime_context().gcs_address
    cfg_path = _config(root, mlflow_server, address)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "OPT_HOME": str(root / "home")}
    out = subprocess.run([OPTCTL, "deploy", "--config", str(cfg_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    with worker(prefect_server, POOL, root / "worker.log", {"OPT_HOME": str(root / "home")}):
        yield root, cfg_path, out.stdout, env


def _deployments(api: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        return {d.name: d for d in c.read_deployments()}


def test_deploy_registers_every_deployment_with_its_schedule(deployed, prefect_server):
    _, _, stdout, _ = deployed
    deps = _deployments(prefect_server)
    assert set(deps) >= {"pipeline-sched", "checkpoint-eval-sched", "data-refresh", "access-housekeeping", f"review-{MODEL}"}
    pipe = deps["pipeline-sched"]
    assert [s.schedule.cron for s in pipe.schedules] == ["0 3 * * *"] and pipe.schedules[0].active
    assert pipe.work_pool_name == POOL and pipe.global_concurrency_limit.limit == 1
    assert pipe.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert pipe.job_variables["env"]["PREFECT_FLOWS_DEFAULT_RETRIES"] == "1"
    ev = deps["checkpoint-eval-sched"].schedules[0]
    assert ev.schedule.interval.total_seconds() == 1800 and not ev.active  # `active: false` registers it paused
    assert deps["data-refresh"].schedules[0].schedule.timezone == "Europe/Paris"
    assert deps[f"review-{MODEL}"].schedules == []
    assert "every 1800 s, paused" in stdout and "prefect worker start --pool opt-test-pool" in stdout


def test_deploy_without_a_prefect_server_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([OPTCTL, "deploy"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "PREFECT_API_URL is not set" in out.stderr


def test_an_interval_schedule_runs_on_the_worker_and_can_be_paused(deployed, prefect_server):
    """The scheduler makes access-housekeeping's runs every 5 s; the worker runs one to completion; pausing stops them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root, _, _, env = deployed
    dep = _deployments(prefect_server)["access-housekeeping"]
    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as c:
        deadline, done = time.monotonic() + 240, []
        only = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        while not done and time.monotonic() < deadline:
            done = c.read_flow_runs(deployment_filter=only, flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["COMPLETED"]))))  # fmt: skip
            time.sleep(1)
        assert done, (root / "worker.log").read_text()[-3000:]
        assert done[0].auto_scheduled  # made by the server's scheduler, not by the test
        out = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "schedule", "pause",
                              "opt-access-housekeeping/access-housekeeping", str(dep.schedules[0].id)], capture_output=True, text=True,
                             env=env, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert not c.read_deployment(dep.id).schedules[0].active
        for run in c.read_flow_runs(deployment_filter=only, flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"])))):  # fmt: skip
            c.delete_flow_run(run.id)  # runs the paused schedule made before the pause: not wanted in the rest of the session
    # what the run did: housekeeping's entries in the access audit trail, read as a reviewer reads them
    out = subprocess.run([OPTCTL, "access", "housekeeping", "--config", str(deployed[1])], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0 and "audit chain: intact" in out.stdout, out.stdout + out.stderr
    entries = int(out.stdout.split("intact (")[1].split()[0])
    assert entries >= 1  # the scheduled run's own `audit.verified` (this one's is appended after the count)


def test_the_pipeline_trains_a_segment_holds_back_a_second_run_and_waits_for_the_reviewer(deployed, prefect_server,
                                                                                          mlflow_server):  # fmt: skip
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from opt.logbook import Logbook

    root, cfg_path, _, env = deployed
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        first = run_deployment("opt-scheduled-pipeline/pipeline-sched", timeout=0)
        wait_for_state(first.id, {"RUNNING"}, timeout_s=120)
        second = run_deployment("opt-scheduled-pipeline/pipeline-sched", timeout=0)
        held = wait_for_state(second.id, {"CANCELLED", "COMPLETED", "FAILED"}, timeout_s=120)
        assert held.state.type.value == "CANCELLED", held.state  # CANCEL_NEW: the run in progress keeps going
        paused = wait_for_state(first.id, {"PAUSED", "COMPLETED", "FAILED", "CRASHED"}, timeout_s=600)
        assert paused.state.type.value == "PAUSED", (root / "worker.log").read_text()[-3000:]

        listed = subprocess.run([OPTCTL, "review", "list", "--config", str(cfg_path)], capture_output=True, text=True, env=env, timeout=120)
        assert listed.returncode == 0 and str(first.id) in listed.stdout, listed.stdout + listed.stderr
        version = listed.stdout.splitlines()[1].split()[0]
        bad = subprocess.run([OPTCTL, "review", "approve", MODEL, "999", "--reason", "x", "--config", str(cfg_path)],
                             capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        ok = subprocess.run([OPTCTL, "review", "approve", MODEL, version, "--by", "rita", "--config", str(cfg_path),
                             "--reason", "card and gate table checked"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert ok.returncode == 0, ok.stdout + ok.stderr
        done = wait_for_state(first.id, {"COMPLETED", "FAILED", "CRASHED"}, timeout_s=120)
        assert done.state.type.value == "COMPLETED"

    c = MlflowClient(mlflow_server)
    mv = c.get_model_version(MODEL, version)
    assert "champion" in (mv.aliases or []) and mv.tags["opt.step"] == "8"  # one segment: pipeline_steps past step 0
    decision = json.loads(mv.tags["opt.review"])
    assert decision["decision"] == "approved" and decision["by"] == "rita" and decision["flow_run"] == str(first.id)
    assert "opt.review_pending" not in mv.tags
    events = [e for e in Logbook(str(root / "store" / "runs" / "sched")).read() if e["event"] in ("review", "promoted")]
    assert [e["event"] for e in events] == ["review", "promoted"] and events[0]["by"] == "rita"
    # the segment stopped at step 8 of a 20-step run: its learning-rate schedule still runs to train.max_steps
    started = [e for e in Logbook(str(root / "store" / "runs" / "sched")).read() if e["event"] == "run_started"]
    assert started[0]["max_steps"] == 20 and started[0]["stop_at_step"] == 8

    # the other deployments find their work: the checkpoint at step 4 has no evaluation yet, the sources did not change
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        evals = run_deployment("opt-checkpoint-eval/checkpoint-eval-sched", timeout=0)
        refresh = run_deployment("opt-data-refresh/data-refresh", timeout=0)
        for run in (evals, refresh):
            assert wait_for_state(run.id, {"COMPLETED", "FAILED", "CRASHED"}, timeout_s=300).state.type.value == "COMPLETED"
    assert (root / "store" / "runs" / "sched" / "step-4" / "eval.json").exists()
    history = c.get_metric_history(mv.run_id, "eval_perplexity")
    assert sorted(m.step for m in history) == [4, 8]


def test_a_failed_scheduled_run_is_retried_and_fails_with_its_reason(deployed, prefect_server):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        run = run_deployment("opt-scheduled-pipeline/pipeline-sched", timeout=0, parameters={"overrides": ["train.max_steps=0"]})
        done = wait_for_state(run.id, {"COMPLETED", "FAILED", "CRASHED"}, timeout_s=240)
    assert done.state.type.value == "FAILED", done.state
    assert done.run_count == 2  # tried, then retried once (schedule.pipeline_retries)
    message = done.state.message or ""
    assert "train.max_steps" in message and "greater than or equal to 1" in message and "Traceback" not in message, message


def _passed_version(tracking: str) -> str:
    """A version that passed its gates (registered directly: the review flow decides on any such version)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    c = MlflowClient(tracking)
    with contextlib.suppress(MlflowException):  # the pipeline test may have registered it already
        c.create_registered_model(MODEL)
    exp = c.get_experiment_by_name("review-tests")
    run = c.create_run(exp.experiment_id if exp else c.create_experiment("review-tests"))
    mv = c.create_model_version(MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags={
        "opt.gate": "passed", "opt.step": "8", "opt.eval_perplexity": "123.0000", "opt.gate_reasons": "[]"})  # fmt: skip
    return str(mv.version)


def test_a_review_nobody_gives_times_out_and_leaves_a_candidate(deployed, prefect_server, mlflow_server):
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    version = _passed_version(mlflow_server)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        run = run_deployment(f"opt-review/review-{MODEL}", timeout=0, parameters={
            "version": version, "config_path": str(deployed[1]), "overrides": ["schedule.approval_timeout_s=3"]})  # fmt: skip
        done = wait_for_state(run.id, {"COMPLETED", "FAILED", "CRASHED"}, timeout_s=180)
    assert done.state.type.value == "COMPLETED", done.state
    mv = MlflowClient(mlflow_server).get_model_version(MODEL, version)
    review = json.loads(mv.tags["opt.review"])
    assert review["decision"] == "timed_out" and "3 s" in review["reason"] and "champion" not in (mv.aliases or [])
    assert "opt.review_pending" not in mv.tags


def test_a_reviewer_decides_in_the_prefect_ui(deployed, prefect_server, mlflow_server):
    """The deployments page lists the schedules; the paused run's Resume form approves the version."""
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.browser import chromium, screenshot

    ui = prefect_server.removesuffix("/api")
    version = _passed_version(mlflow_server)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        run = run_deployment(f"opt-review/review-{MODEL}", timeout=0, parameters={"version": version, "config_path": str(deployed[1])})
        wait_for_state(run.id, {"PAUSED"}, timeout_s=180)
        with chromium() as browser:
            page = browser.new_page()
            page.goto(f"{ui}/deployments", wait_until="networkidle")
            screenshot(page, "prefect-deployments")
            page.get_by_text("pipeline-sched").first.wait_for(timeout=30000)
            body = page.inner_text("body")
            assert "access-housekeeping" in body and "data-refresh" in body and f"review-{MODEL}" in body
            assert "At 03:00" in body or "0 3 * * *" in body, body[:2000]  # the pipeline's cron, as the UI words it
            screenshot(page, "prefect-deployments")
            page.goto(f"{ui}/runs/flow-run/{run.id}", wait_until="networkidle")
            page.get_by_role("button", name="Resume").first.click()
            dialog = page.get_by_role("dialog")
            dialog.wait_for(timeout=30000)
            # the form Prefect renders from ReviewDecision's schema: a choice, then two text fields
            dialog.locator("textarea").nth(1).wait_for(timeout=30000)  # the form arrives after the dialog
            dialog.locator(".p-select-button__icon").first.click(force=True)  # the decision: Prefect's select of the two values
            page.get_by_role("option", name="approve").click()
            texts = dialog.locator("textarea")
            texts.nth(0).fill("uma")
            texts.nth(1).fill("checked the card in MLflow")
            screenshot(page, "prefect-review-form")
            dialog.get_by_role("button", name="Submit").click()
            done = wait_for_state(run.id, {"COMPLETED", "FAILED", "CRASHED"}, timeout_s=120)
            page.reload(wait_until="networkidle")
            screenshot(page, "prefect-review-done")
    assert done.state.type.value == "COMPLETED", done.state
    mv = MlflowClient(mlflow_server).get_model_version(MODEL, version)
    review = json.loads(mv.tags["opt.review"])
    assert review["decision"] == "approved" and review["by"] == "uma" and "champion" in (mv.aliases or [])
