"""Running lm-eval tasks on one of our models: lm-eval's results JSON, with OPT's token-normalised accuracy added.

Bundled tasks (`opt/eval/tasks`) are always on the include path; lm-eval's own tasks (the OPT suite) fetch their
data from the Hugging Face hub, so without the network they need a local datasets cache: the run says so in one
line instead of a traceback. lm-eval's `acc_norm` divides a choice's log-likelihood by its length in characters;
OPT and GPT-3 divided by its length in tokens: that figure is `acc_norm_tokens`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from opt.errors import OptError

log = logging.getLogger(__name__)

# The zero- and few-shot tasks OPT reports (paper, table 1 and appendix A), by lm-eval's names.
OPT_SUITE = (
    "hellaswag", "storycloze_2016", "piqa", "arc_easy", "arc_challenge", "openbookqa", "wsc273", "winogrande",
    "boolq", "cb", "copa", "wsc", "multirc", "wic", "rte", "record",
)  # fmt: skip


class EvalTaskError(OptError):
    """A task that cannot run here (unknown, or its data is not reachable); the message says what to do."""


def run_tasks(lm: Any, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
              limit: int | None = None, seed: int = 1234) -> dict[str, Any]:  # fmt: skip
    """lm-eval's `simple_evaluate` over `lm` (an `OPTHarnessLM` or any lm-eval LM): its results dict."""
    _offline_defaults()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from opt.eval.tasks import TASKS_DIR

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalTaskError(f"unknown lm-eval task(s): {', '.join(unknown)}; bundled ones are {', '.join(_bundled())}, "
                            "or add a folder of task YAMLs with --include-path")  # fmt: skip
    from opt.console import quiet, stderr_to_log_file

    try:
        with stderr_to_log_file(quiet()):  # lm-eval's own progress bars: not on the terminal of a quiet optctl
            results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                      log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, bootstrap_iters=0)  # fmt: skip
    except (ConnectionError, OSError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if any(w in str(e).lower() for w in ("offline", "connect", "resolve")):
            raise EvalTaskError(f"a task's data is not in the local datasets cache and the hub cannot be reached ({first}); "
                                "run once with network access or point HF_DATASETS_CACHE at a cache that has it") from None  # fmt: skip
        raise
    if results is None:
        raise EvalTaskError("lm-eval returned no results")
    add_token_normalised_accuracy(results, lm)
    results.pop("samples", None)  # per-document records: large, and they hold the task text
    return results


def add_token_normalised_accuracy(results: dict[str, Any], lm: Any) -> None:
    """OPT's normalisation: the choice with the highest log-likelihood per token (`acc_norm_tokens`)."""
    for task, samples in (results.get("samples") or {}).items():
        hits = []
        for s in samples:
            args = s.get("arguments") or []
            if not args or len(args) < 2 or not isinstance(s.get("target"), int):
                break  # not a multiple-choice task
            lls = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in s["resps"]]
            lengths = [max(1, len(_continuation_tokens(lm, a))) for a in args]
            best = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
            hits.append(best == s["target"])
        if hits and task in results["results"]:
            results["results"][task]["acc_norm_tokens,none"] = sum(hits) / len(hits)


def _continuation_tokens(lm: Any, arguments: Any) -> list[int]:
    context, continuation = arguments[0], arguments[1]
    if not context:
        return list(lm.tok_encode(continuation, add_special_tokens=False))
    return list(lm._encode_pair(context, continuation)[1])


def write_results(results: dict[str, Any], out: str | Path) -> Path:
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    except OSError as e:
        raise EvalTaskError(f"cannot write {out}: {e.strerror or e}; choose another --out") from None
    return path


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> metric -> value (lm-eval's `metric,filter` keys, with the filter dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items() if "," in k and isinstance(v, (int, float))
                     and not k.split(",")[0].endswith("_stderr")}  # fmt: skip
        n = (results.get("n-samples") or {}).get(task, {}).get("effective")
        if n:
            out[task]["n"] = float(n)  # documents scored: the gate's standard errors need it
    return out


def _bundled() -> list[str]:
    from opt.eval.tasks import BUNDLED

    return list(BUNDLED)


def _offline_defaults() -> None:
    # Bundled tasks need no network; lm-eval's own may still find their data in a local cache. Never hang on the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())


class _QuietCustomDataset(logging.Filter):
    """lm-eval warns about `--metadata` for every task with a custom loader, which all the bundled ones have."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()
