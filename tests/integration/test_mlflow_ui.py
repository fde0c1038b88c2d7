"""What a reviewer sees in MLflow's UI, checked in headless Chromium against the session's real `mlflow server`.

The version page must show the model card, the gate tags and the aliases; the experiment link the pipeline prints
must open on the training views (runs, with the dataset as their input); the run's page must show the three plots.
Screenshots: test-output/screenshots/mlflow-*.png.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from opt.config import load_config
from opt.tracking import client, ui_links
from tests.browser import chromium, screenshot
from tests.integration.conftest import overrides

pytestmark = pytest.mark.slow

TIMEOUT_MS = 60_000  # the first page load compiles MLflow's UI bundle in a cold browser: slow on 2 cores


def check_version_page(page, url: str, version: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(url)
    card = page.get_by_role("heading", name="Data lineage")
    card.wait_for(timeout=TIMEOUT_MS)
    for heading in ("Training (from the run's logbook)", "Evaluation", "Gate", "Intended use", "Licence", "Limitations", "Access"):
        assert page.get_by_role("heading", name=heading, exact=True).is_visible(), heading
    # the card's tables render as tables: the source row of the lineage, the task rows, the gate rows
    lineage = page.get_by_role("row").filter(has_text="python-docs").first
    assert re.search(r"python-docs\s+\d[\d,]*\s+\d+\s+\d+", lineage.inner_text()), lineage.inner_text()

    def row(*cells: str):  # type: ignore[no-untyped-def]
        rows = page.get_by_role("row")
        for text in cells:
            rows = rows.filter(has=page.get_by_role("cell", name=text, exact=True))
        return rows

    assert row("pydocs_choice", "acc_norm_tokens").count() == 1
    assert row("integrity:hf-export", "pass").count() == 1
    # the gate tags, as the version's tags table shows them
    gate = page.get_by_role("row").filter(has=page.get_by_text("opt.gate", exact=True))
    assert "passed" in gate.inner_text()
    reasons = page.get_by_role("row").filter(has=page.get_by_text("opt.gate_reasons", exact=True))
    assert "every configured task was evaluated" in reasons.inner_text()
    screenshot(page, f"mlflow-version-{version}")
    gate.scroll_into_view_if_needed()  # the tags table scrolls on its own
    screenshot(page, f"mlflow-version-{version}-tags")
    # the aliases, in the page's header
    assert re.search(r"Aliases\s*:?\s*@\s*candidate", page.inner_text("body")), "the candidate alias is not in the header"


def check_training_view(page, url: str, run_name: str, dataset_id: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(url)
    row = page.get_by_role("link", name=run_name, exact=True)
    row.first.wait_for(timeout=TIMEOUT_MS)
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url
    screenshot(page, "mlflow-experiment-runs")
    # the run's data lineage: the dataset (context Training, its per-source profile) and the raw file it came from
    page.get_by_test_id("open-dataset-drawer").filter(has_text=dataset_id).first.click()
    drawer = page.get_by_role("dialog")
    drawer.get_by_text("2 datasets used").wait_for(timeout=TIMEOUT_MS)
    text = drawer.inner_text()
    assert re.search(rf"{dataset_id}.*\n\s*Training", text) and "python-docs:python-docs.jsonl" in text and "Source" in text, text
    assert re.search(r"python-docs\.near.duplicates.removed:\s*\d+", text) and re.search(r"train.tokens:\s*\d+", text), text
    screenshot(page, "mlflow-experiment-dataset")


def check_plots(page, url: str, folder: str, pngs: dict[str, bytes]) -> None:  # type: ignore[no-untyped-def]
    """The run's Artifacts tab, opened at `url`: clicking each plot in the tree shows it, at the logged PNG's size."""
    page.goto(url)
    for name, png in pngs.items():
        width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR
        page.get_by_text(name, exact=True).first.click(timeout=TIMEOUT_MS)
        page.get_by_text(f"{folder}/{name}", exact=True).first.wait_for(timeout=TIMEOUT_MS)  # the preview's title: this file
        size = f"img => img.complete && img.naturalWidth === {width} && img.naturalHeight === {height}"
        page.wait_for_function(f"() => [...document.querySelectorAll(\"img[src^='blob:']\")].some({size})", timeout=TIMEOUT_MS)
        screenshot(page, "mlflow-plot-" + name.removesuffix(".png"))


def test_reviewer_sees_card_gates_aliases_and_plots_in_mlflows_ui(pipeline_run, mlflow_server):
    root, summary = pipeline_run
    cfg = load_config(None, overrides(root))
    version = summary["registration"]["version"]
    mv = client(cfg.tracking.uri).get_model_version(cfg.model_name, version)
    (version_url, _), (experiment_url, _) = ui_links(mlflow_server, cfg.tracking.uri, cfg.tracking.experiment, cfg.model_name, version)
    exp_id = experiment_url.split("/experiments/")[1].split("?")[0]
    assert client(cfg.tracking.uri).get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    step = summary["train"]["checkpoint"].rsplit("-", 1)[1]
    with chromium(height=3600) as browser:
        page = browser.new_page()
        check_version_page(page, version_url, version)
        check_training_view(page, experiment_url, cfg.train.run, summary["dataset"]["id"])
        folder = f"registry/step-{step}/plots"
        names = ("training.png", "tasks.png", "perplexity_by_source.png")
        pngs = {
            n: Path(client(cfg.tracking.uri).download_artifacts(mv.run_id, f"{folder}/{n}", str(root / "ui"))).read_bytes() for n in names
        }
        url = f"{mlflow_server}/#/experiments/{exp_id}/runs/{mv.run_id}/artifacts/{folder}/{names[0]}?workflowType=machine_learning"
        check_plots(page, url, folder, pngs)
