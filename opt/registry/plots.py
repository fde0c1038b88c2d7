"""The figures a reviewer looks at on the training run's page in MLflow, made at registration.

Three matplotlib figures, logged with `MlflowClient.log_figure` under `registry/step-<N>/plots/`:
- `training.png`: training loss, learning rate and gradient norm against the step (from the run's metric history),
  with the steps where a loss spike was rolled back marked;
- `tasks.png`: every evaluated task's score beside the champion's, with one binomial standard error as error bars;
- `perplexity_by_source.png`: validation perplexity per data source, beside the champion's where it recorded them.
matplotlib is imported here only, with the Agg backend: registration needs no display.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from opt.eval.report import EvalReport
from opt.registry.gates import Champion

log = logging.getLogger(__name__)

TRAINING_METRICS = (("loss", "training loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"))
MINE, THEIRS = "#1f77b4", "#bbbbbb"


def primary_metric(scores: dict[str, float]) -> str | None:
    """The score a task's plot shows: OPT's token-normalised accuracy when there is one, else lm-eval's acc."""
    return next((m for m in ("acc_norm_tokens", "acc", "acc_norm") if m in scores), None)


def _figure(rows: int, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height), dpi=100, layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def training_figure(history: dict[str, list[tuple[int, float]]], rollbacks: list[int], title: str) -> Any:
    """Loss, LR and gradient norm against the step; dashed lines where a spike was rolled back."""
    fig, axes = _figure(len(TRAINING_METRICS), 7.5)
    for ax, (key, label) in zip(axes, TRAINING_METRICS, strict=True):
        points = sorted(history.get(key, []))
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], color=MINE, linewidth=1.2)
        else:
            ax.text(0.5, 0.5, f"no '{key}' points in this run", ha="center", va="center", transform=ax.transAxes)
        for step in rollbacks:
            ax.axvline(step, color="#d62728", linestyle="--", linewidth=0.8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step" + (" (red: spike rolled back)" if rollbacks else ""))
    fig.suptitle(title)
    return fig


def tasks_figure(report: EvalReport, champion: Champion | None, title: str) -> Any:
    """Each task's primary score (with one standard error) beside the champion's."""
    fig, (ax,) = _figure(1, 4.0)
    tasks = sorted(t for t in report.tasks if primary_metric(report.tasks[t]))
    if not tasks:
        ax.text(0.5, 0.5, "no lm-eval tasks were evaluated", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(title)
        return fig
    width = 0.38 if champion else 0.6
    sides = [(-width / 2 if champion else 0.0, report.tasks, "this version", MINE)]
    if champion:
        sides.append((width / 2, champion.tasks, f"champion v{champion.version}", THEIRS))
    for offset, scores_of, label, color in sides:
        xs, ys, errs = [], [], []
        for i, t in enumerate(tasks):
            scores, metric = scores_of.get(t, {}), primary_metric(report.tasks[t])
            if metric in scores:
                p, n = scores[metric], scores.get("n", 0.0)
                xs.append(i + offset)
                ys.append(p)
                errs.append(math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0)
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, color=color, label=label)
        ax.bar_label(bars, fmt="%.3f", padding=2)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({primary_metric(report.tasks[t])})" for t in tasks])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    fig.suptitle(title)
    return fig


def perplexity_figure(report: EvalReport, champion: Champion | None, title: str) -> Any:
    """Validation perplexity per source (log scale), beside the champion's."""
    fig, (ax,) = _figure(1, 3.5)
    champion_per_source = champion.per_source if champion else {}
    sources = sorted(report.per_source)
    width = 0.38 if champion_per_source else 0.6
    mine = [report.per_source[s]["perplexity"] for s in sources]
    bars = ax.bar(
        [i - (width / 2 if champion_per_source else 0) for i in range(len(sources))], mine, width, color=MINE, label="this version"
    )
    ax.bar_label(bars, fmt="%.1f", padding=2)
    if champion_per_source:
        have = [(i, champion_per_source[s]) for i, s in enumerate(sources) if s in champion_per_source]
        ax.bar(
            [i + width / 2 for i, _ in have],
            [v for _, v in have],
            width,
            color=THEIRS,
            label=f"champion v{champion.version}" if champion else "",
        )
    ax.set_xticks(range(len(sources)), sources)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    fig.suptitle(title)
    return fig


def log_plots(c: Any, run_id: str, artifact_dir: str, report: EvalReport, champion: Champion | None, rollbacks: list[int],
              title: str) -> list[str]:  # fmt: skip
    """Make the three figures and log them to the run; returns their artifact paths. A failure to plot never
    stops registration: it is logged and the card still says everything."""
    history = {}
    for key, _ in TRAINING_METRICS:
        try:
            history[key] = [(m.step, m.value) for m in c.get_metric_history(run_id, key)]
        except Exception as e:
            log.warning("could not read the run's %s history from MLflow: %s", key, str(e).splitlines()[0][:200])
    figures = {
        "training.png": lambda: training_figure(history, rollbacks, f"{title}: training"),
        "tasks.png": lambda: tasks_figure(
            report, champion, f"{title}: tasks" + (" against the champion" if champion else " (no champion yet)")
        ),
        "perplexity_by_source.png": lambda: perplexity_figure(report, champion, f"{title}: validation perplexity by source"),
    }
    logged = []
    for name, make in figures.items():
        path = f"{artifact_dir}/{name}"
        try:
            c.log_figure(run_id, make(), path)
            logged.append(path)
        except Exception as e:
            log.warning("could not log %s to MLflow: %s", path, str(e).splitlines()[0][:200])
    return logged
