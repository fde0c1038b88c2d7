"""Validation perplexity per source, written as `eval.json` beside the checkpoint and to MLflow."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from opt import storage
from opt.data.loader import eval_batches, open_tokens
from opt.data.manifest import DatasetManifest
from opt.eval.report import EVAL_FILE, TASKS_FILE, EvalReport
from opt.model import OPT
from opt.train.checkpoint import CommittedCheckpoint
from opt.train.export import load_checkpoint_model

log = logging.getLogger(__name__)


@torch.no_grad()
def split_loss(model: OPT, tokens, seq_len: int, batch_size: int, max_batches: int | None) -> tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over a validation split."""
    total, count = 0.0, 0
    for i, (x, y) in enumerate(eval_batches(tokens, seq_len, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(x)
        total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return total, count


def evaluate(
    ckpt: CommittedCheckpoint, manifest: DatasetManifest, cache_dir: str | Path, batch_size: int = 8, max_batches: int | None = None,
    tasks: TaskRun | None = None,
) -> EvalReport:  # fmt: skip
    """Perplexity of the checkpoint on every source's held-out split, and the lm-eval `tasks`; writes `eval.json`
    (and lm-eval's results JSON, `lm_eval.json`) beside it."""
    model = load_checkpoint_model(ckpt, cache_dir)
    per_source: dict[str, dict[str, float]] = {}
    total, count = 0.0, 0
    for name in manifest.sources:
        tokens = open_tokens(manifest, f"valid/{name}.bin", cache_dir)
        if len(tokens) < 2:
            continue
        s, n = split_loss(model, tokens, manifest.seq_len, batch_size, max_batches)
        per_source[name] = {"loss": s / n, "perplexity": math.exp(s / n), "tokens": n}
        total, count = total + s, count + n
    if count == 0:
        raise ValueError(f"dataset {manifest.dataset_id} has no validation tokens to evaluate on")
    report = EvalReport(ckpt.uri, ckpt.step, manifest.dataset_id, total / count, math.exp(total / count), count, per_source)
    if tasks is not None and tasks.names:
        from tokenizers import Tokenizer

        from opt.data.tokenizer import TOKENIZER_FILE
        from opt.eval.harness import harness_lm_class
        from opt.eval.suite import run_tasks, summary

        tok = Tokenizer.from_file(str(storage.local_path(manifest.file_uri(f"tokenizer/{TOKENIZER_FILE}"), cache_dir)))
        lm = harness_lm_class()(model=model, tokenizer=tok, batch_tokens=tasks.batch_tokens)
        results = run_tasks(lm, tasks.names, tasks.include_path, tasks.num_fewshot, tasks.limit)
        storage.write_text(storage.join(ckpt.uri, TASKS_FILE), json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
        report.tasks = summary(results)
    storage.write_text(storage.join(ckpt.uri, EVAL_FILE), report.to_json())
    return report


@dataclass(frozen=True)
class TaskRun:
    """Which lm-eval tasks to run, and how (from the config's `eval` section)."""

    names: list[str]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    batch_tokens: int = 2048


def log_to_mlflow(report: EvalReport, tracking_uri: str, run_id: str) -> None:
    from opt.tracking import MetricsBuffer

    buf = MetricsBuffer(tracking_uri, run_id)
    buf.log(report.mlflow_metrics(), report.step)
    if not buf.close():
        log.warning("evaluation figures were written to eval.json but not to MLflow")
