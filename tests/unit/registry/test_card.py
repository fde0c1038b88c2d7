"""The model card a reviewer reads in MLflow, the figures logged beside it, and the run's data lineage in MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from opt.config import RegistryConfig
from opt.data.manifest import DatasetManifest, SourceStats
from opt.eval.report import EvalReport
from opt.registry.card import CardFacts, render
from opt.registry.gates import Champion, Check

MANIFEST = DatasetManifest(
    dataset_id="d0123456789abcde", uri="/store/datasets/d0123456789abcde", seq_len=128, vocab_size=2048, tokenizer_sha256="ab" * 32,
    inputs=[{"source": "pile-cc", "uri": "/data/cc.jsonl", "sha256": "cd" * 32, "size": 10}],
    sources={"pile-cc": SourceStats(docs_in=1000, dropped={"symbols": 7}, exact_duplicates=31, near_duplicates=12, train_docs=900,
                                    valid_docs=50, train_tokens=123_456, valid_tokens=6_543),
             "reddit": SourceStats(docs_in=10, train_docs=9, train_tokens=999, valid_tokens=11)},
    files={}, config={"dedup": {"threshold": 0.95}}, weights={"pile-cc": 1.0, "reddit": 0.5},
    dedup={"bands": 10, "rows": 12, "decision": "exact_jaccard", "candidate_pairs": 1234, "checked": 1200, "rejected": 1188,
           "candidate_docs": 2000},
)  # fmt: skip
REPORT = EvalReport(
    checkpoint="/store/runs/r/step-40", step=40, dataset_id=MANIFEST.dataset_id, loss=3.0, perplexity=20.1, tokens=6554,
    per_source={"pile-cc": {"perplexity": 19.0, "tokens": 6543}, "reddit": {"perplexity": 80.0, "tokens": 11}},
    tasks={"pydocs_choice": {"acc": 0.4, "acc_norm": 0.42, "acc_norm_tokens": 0.41, "n": 200.0}, "pydocs_cloze": {"acc": 0.3, "n": 100.0}},
)  # fmt: skip
CHAMP = Champion("3", 20.0, {"pydocs_choice": {"acc": 0.55, "acc_norm_tokens": 0.5, "n": 200.0}}, {"pile-cc": 18.0})
CHECKS = [
    Check("perplexity", True, 20.1, 50.0, "validation perplexity 20.10 <= max 50"),
    Check("regression:pydocs_choice.acc", False, 0.4, 0.49, "0.4000 is below champion v3's 0.5500 by more than 2 | 3 stderr"),
]
EVENTS = [
    {"ts": "2026-12-01T10:00:00Z", "t": 0.0, "event": "run_started"},
    {"ts": "2026-12-01T10:00:01Z", "t": 1.0, "event": "workers_started"},
    {"ts": "2026-12-01T10:00:05Z", "t": 5.0, "event": "checkpoint", "step": 20},
    {"ts": "2026-12-01T10:00:07Z", "t": 7.0, "event": "failure", "host": "node-b", "node_lost": True, "attempt": 0},
    {"ts": "2026-12-01T10:00:08Z", "t": 8.0, "event": "restart", "attempt": 1},
    {"ts": "2026-12-01T10:00:08Z", "t": 8.0, "event": "workers_started"},
    {"ts": "2026-12-01T10:00:10Z", "t": 10.0, "event": "first_step", "attempt": 1, "step": 21},
    {"ts": "2026-12-01T10:00:11Z", "t": 11.0, "event": "spike", "step": 30},
    {"ts": "2026-12-01T10:00:11Z", "t": 11.0, "event": "rollback", "to_step": 20},
    {"ts": "2026-12-01T10:00:20Z", "t": 20.0, "event": "run_finished", "step": 40},
]


def cfg(access_class: str = "gated") -> SimpleNamespace:
    return SimpleNamespace(model_name="opt-x", model=SimpleNamespace(preset="debug"), train=SimpleNamespace(run="r"),
                           access_class=access_class, registry=RegistryConfig())  # fmt: skip


def card(champion: Champion | None = CHAMP, events: list | None = None) -> str:
    facts = CardFacts(
        239_488, REPORT, CHECKS, champion, EVENTS if events is None else events, "Research licence (non-commercial)\n\n1. ..."
    )
    return render(cfg(), MANIFEST, facts)


def rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the Markdown table rows whose first cell is `first_cell` (a `\\|` is a pipe inside a cell)."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("\\|", "\x00").strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            out.append([c.replace("\x00", "|") for c in cells])
    return out


def test_the_card_holds_the_lineage_the_training_summary_and_every_score_beside_the_champions() -> None:
    text = card()
    assert "239,488 parameters" in text and "preset `debug`" in text and "compared with champion v3" in text
    # lineage: every source with documents in, duplicates removed, filtered, tokens, weight
    assert rows(text, "pile-cc")[0] == ["pile-cc", "1,000", "31", "12", "symbols 7", "900", "123,456", "6,543", "1"]
    assert rows(text, "reddit")[0][-1] == "0.5" and "`/data/cc.jsonl`" in text
    assert "Near duplicates: exact Jaccard >= 0.95 on 1,234 LSH candidate pairs (10 x 12 bands): 1,200 checked, 1,188 rejected." in text
    # training summary from the logbook: one restart after a lost node, one spike rollback
    (summary,) = [r for r in rows(text, "40") if len(r) == 9]
    assert summary[:7] == ["40", "2", "1", "1", "1 (node-b)", "1", "1"]
    # every task metric beside the champion's, with the difference; `n` is the question count, not a metric row
    choice = {r[1]: r for r in rows(text, "pydocs_choice")}
    assert choice["acc"][2:6] == ["0.4000", "0.5500", "-0.1500", "200"] and "n" not in choice
    assert rows(text, "pydocs_cloze")[0][2:5] == ["0.3000", "-", "-"]  # the champion never ran it
    # the gate table: a pipe inside a reason stays inside its cell
    (failed,) = rows(text, "regression:pydocs_choice.acc")
    assert failed[1] == "FAIL" and failed[4].endswith("more than 2 | 3 stderr") and len(failed) == 5
    assert "**Gate: FAILED**" in text
    for section in ("## Intended use", "## Licence", "## Limitations", "## Access"):
        assert section in text
    assert "Research licence (non-commercial). The full text is `LICENCE.txt`" in text
    assert RegistryConfig().intended_use in text and RegistryConfig().limitations in text


def test_the_card_says_plainly_when_there_is_no_champion_or_logbook() -> None:
    text = card(champion=None, events=[])
    assert "no champion to compare with yet" in text and "No logbook was found for this run." in text
    assert rows(text, "pydocs_choice")[0][3] == "-"


def test_figures_show_this_version_beside_the_champion() -> None:
    from matplotlib.container import BarContainer

    from opt.registry.plots import perplexity_figure, tasks_figure, training_figure

    ax = tasks_figure(REPORT, CHAMP, "t").axes[0]
    mine, theirs = [c for c in ax.containers if isinstance(c, BarContainer)]
    # the choice task shows OPT's token-normalised accuracy, the cloze its acc; the champion only has the choice task
    assert [round(b.get_height(), 3) for b in mine] == [0.41, 0.3] and [round(b.get_height(), 3) for b in theirs] == [0.5]
    assert [lbl.get_text() for lbl in ax.get_legend().get_texts()] == ["this version", "champion v3"]
    ax = perplexity_figure(REPORT, CHAMP, "t").axes[0]
    assert [b.get_height() for b in ax.containers[0]] == [19.0, 80.0] and [b.get_height() for b in ax.containers[1]] == [18.0]
    fig = training_figure({"loss": [(2, 5.0), (1, 6.0)], "lr": [(1, 1e-3)]}, [30], "t")
    loss_ax, _, norm_ax = fig.axes
    assert list(loss_ax.lines[0].get_xdata()) == [1, 2] and len(loss_ax.lines) == 2  # the curve and the spike's line
    assert "no 'grad_norm' points" in norm_ax.texts[0].get_text()


def test_plots_and_dataset_inputs_reach_a_real_mlflow_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from opt.registry.plots import log_plots
    from opt.tracking import EXPERIMENT_KIND, get_or_create_experiment, log_dataset_inputs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = get_or_create_experiment(uri, "e", str(tmp_path / "art"))
    c = MlflowClient(uri)
    assert c.get_experiment(exp).tags[EXPERIMENT_KIND[0]] == "custom_model_development"  # the UI opens on training views
    run = c.create_run(exp).info.run_id
    for step in range(1, 6):
        c.log_metric(run, "loss", 6.0 - step / 10, step=step)
    paths = log_plots(c, run, "registry/step-5/plots", REPORT, CHAMP, [], "opt-x v1")
    assert paths == [f"registry/step-5/plots/{n}" for n in ("training.png", "tasks.png", "perplexity_by_source.png")]
    for p in paths:
        local = Path(c.download_artifacts(run, p, str(tmp_path / "dl")))
        assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and local.stat().st_size > 5000
    log_dataset_inputs(uri, run, MANIFEST)
    log_dataset_inputs(uri, run, MANIFEST)  # a resumed run logs them again: nothing is added
    inputs = c.get_run(run).inputs.dataset_inputs
    assert len(inputs) == 2
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert by_context["training"].name == MANIFEST.dataset_id
    profile = json.loads(by_context["training"].profile)
    assert profile["pile-cc.near_duplicates_removed"] == 12 and profile["train_tokens"] == MANIFEST.train_tokens
    assert by_context["source"].name == "pile-cc:cc.jsonl" and json.loads(by_context["source"].source)["uri"] == "file:///data/cc.jsonl"
