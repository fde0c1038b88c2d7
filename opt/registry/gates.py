"""The registration gate: named checks, each with its verdict, value, threshold and reason.

A version becomes `candidate` only if every check passes. The checks:
- `perplexity`: the validation perplexity is at most `registry.gate.max_perplexity`;
- `task:<task>.<metric>`: each configured minimum score (`registry.gate.min_scores`);
- `completeness`: every task the config names was evaluated;
- `regression:perplexity` and `regression:<task>.<metric>` against the current `champion`: perplexity at most
  `max_perplexity_ratio` x the champion's; a task score no lower than the champion's by more than
  `stderr_multiple` standard errors of the difference (binomial, from each side's sample count), so noise on a
  200-question task does not fail a model and a real drop does;
- `integrity`: the checkpoint's commit marker verifies (every shard's size and sha256), the dataset files the
  evaluation read verify against the dataset manifest, and the Hugging Face export gives our logits.
No training platform we know gates registration on a regression against the model in use: this one does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | str | None
    threshold: float | str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Champion:
    """What the gate compares with: the version aliased `champion` (its tags)."""

    version: str
    perplexity: float
    tasks: dict[str, dict[str, float]]
    per_source: dict[str, float] = field(default_factory=dict)
    """Validation perplexity per data source (for the card's plot; older versions did not record it)."""


def _stderr(p: float, n: float) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1.0))


def check_all(gate: Any, perplexity: float, tasks: dict[str, dict[str, float]], wanted_tasks: list[str],
              champion: Champion | None, integrity: list[Check]) -> list[Check]:  # fmt: skip
    """Every check of the gate policy `gate` (a `GateConfig`) on one evaluated checkpoint."""
    checks = [
        Check("perplexity", perplexity <= gate.max_perplexity, round(perplexity, 4), gate.max_perplexity,
              f"validation perplexity {perplexity:.2f} {'<=' if perplexity <= gate.max_perplexity else '>'} max {gate.max_perplexity:g}"),
    ]  # fmt: skip
    missing = [t for t in wanted_tasks if t not in tasks]
    checks.append(Check("completeness", not missing, len(wanted_tasks) - len(missing), len(wanted_tasks),
                        "every configured task was evaluated" if not missing else f"not evaluated: {', '.join(missing)}"))  # fmt: skip
    for key, least in sorted(gate.min_scores.items()):
        task, _, metric = key.rpartition(".")
        value = tasks.get(task, {}).get(metric)
        ok = value is not None and value >= least
        shown = "missing" if value is None else f"{value:.4f}"
        checks.append(Check(f"task:{key}", ok, value, least, f"{key} {shown} {'>=' if ok else '<'} min {least:g}"))
    if champion is not None:
        checks += _regression(gate, perplexity, tasks, champion)
    return checks + integrity


def _regression(gate: Any, perplexity: float, tasks: dict[str, dict[str, float]], champion: Champion) -> list[Check]:
    bound = champion.perplexity * gate.max_perplexity_ratio
    out = [Check("regression:perplexity", perplexity <= bound, round(perplexity, 4), round(bound, 4),
                 f"perplexity {perplexity:.2f} {'<=' if perplexity <= bound else '>'} {gate.max_perplexity_ratio:g} x champion "
                 f"v{champion.version}'s {champion.perplexity:.2f}")]  # fmt: skip
    for task, theirs in sorted(champion.tasks.items()):
        ours = tasks.get(task)
        if ours is None:
            out.append(Check(f"regression:{task}", False, None, None, f"{task} was not evaluated; champion v{champion.version} has it"))
            continue
        for metric in gate.regression_metrics:
            if metric not in theirs or metric not in ours:
                continue
            a, b = ours[metric], theirs[metric]
            se = math.hypot(_stderr(a, ours.get("n", 1)), _stderr(b, theirs.get("n", 1)))
            floor = b - gate.stderr_multiple * se
            ok = a >= floor
            out.append(Check(f"regression:{task}.{metric}", ok, round(a, 4), round(floor, 4),
                             f"{task} {metric} {a:.4f} {'>=' if ok else '<'} champion v{champion.version}'s {b:.4f} - "
                             f"{gate.stderr_multiple:g} x stderr {se:.4f}"))  # fmt: skip
    return out


def passed_all(checks: list[Check]) -> bool:
    return all(c.passed for c in checks)


def reasons_of(checks: list[Check]) -> list[str]:
    """Failed checks first: what a reviewer must read."""
    return [c.reason for c in checks if not c.passed] + [c.reason for c in checks if c.passed]


def integrity_checks(ckpt: Any, manifest: Any, export_dir: Path, cache_dir: Path) -> list[Check]:
    """The checkpoint's commit marker verifies; the dataset files evaluation read (held-out splits, tokenizer)
    verify against the dataset manifest; the Hugging Face export gives our logits (fp32 roundoff)."""
    from opt import storage
    from opt.train.checkpoint import verify

    out = []
    try:
        verify(ckpt.uri)
        out.append(Check("integrity:checkpoint", True, len(ckpt.files), None, f"every shard of {ckpt.uri} matches its commit marker"))
    except (OSError, ValueError, KeyError) as e:
        out.append(Check("integrity:checkpoint", False, None, None, f"checkpoint does not verify: {e}"))
    bad = []
    read = {rel: meta for rel, meta in manifest.files.items() if rel.startswith(("valid/", "tokenizer/"))}
    for rel, meta in sorted(read.items()):
        try:
            info = storage.stat(manifest.file_uri(rel))
            if info.size != meta["size"] or info.sha256 != meta["sha256"]:
                bad.append(rel)
        except (OSError, ValueError) as e:
            bad.append(f"{rel} ({e})")
    why = f"{len(read)} evaluated dataset files match the manifest" if not bad else f"differ from the manifest: {', '.join(bad)}"
    out.append(Check("integrity:dataset", not bad, len(read) - len(bad), len(read), why))
    out.append(_hf_round_trip(export_dir))
    return out


def _hf_round_trip(export_dir: Path) -> Check:
    import torch
    import transformers

    from opt.model.checkpoint import load_model

    ours = load_model(export_dir / "consolidated").eval()
    hf = transformers.OPTForCausalLM.from_pretrained(export_dir / "hf").eval()
    ids = torch.Generator().manual_seed(0)
    x = torch.randint(4, ours.cfg.vocab_size, (2, min(32, ours.cfg.max_seq_len)), generator=ids)
    with torch.no_grad():
        want, have = ours(x), hf(input_ids=x).logits
    diff = (want - have).abs().max().item()
    bound = 2.0**-16 * max(want.abs().max().item(), 1e-30)  # fp32 roundoff at the logits' scale (tests/numerics.py)
    verdict = "equal" if diff <= bound else "differ from"
    return Check(
        "integrity:hf-export", diff <= bound, diff, bound, f"the Hugging Face export's logits {verdict} ours (max |diff| {diff:.2e})"
    )
