"""The evaluation report: `eval.json` beside the checkpoint (no torch needed to read it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

EVAL_FILE = "eval.json"
TASKS_FILE = "lm_eval.json"  # lm-eval's own results JSON, beside eval.json


@dataclass
class EvalReport:
    checkpoint: str
    step: int
    dataset_id: str
    loss: float
    perplexity: float
    tokens: int
    per_source: dict[str, dict[str, float]]
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    """lm-eval task -> metric -> value (acc, acc_norm, acc_norm_tokens, perplexity...)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def mlflow_metrics(self) -> dict[str, float]:
        out = {"eval_loss": self.loss, "eval_perplexity": self.perplexity}
        for name, m in self.per_source.items():
            out[f"eval_perplexity.{name}"] = m["perplexity"]
        for task, metrics in self.tasks.items():
            for metric, value in metrics.items():
                out[f"eval.{task}.{metric}"] = value
        return out
