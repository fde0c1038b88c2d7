"""The model card: a model version's description in MLflow, and the `README.md` beside its weights.

It is what a reviewer reads before promoting or releasing a version, so it holds everything they decide on, with
no need to open another page: the model (preset, parameters), its data lineage (dataset id, every source with its
documents, duplicates and filtered documents removed, and tokens), the training run's summary from its logbook
(steps, restarts, rollbacks, hosts lost, time lost), every task's score beside the champion's, the gate table,
and the intended use, licence and limitations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opt.data.manifest import DatasetManifest
from opt.eval.report import EvalReport
from opt.registry.gates import Champion, Check, passed_all

DOWNLOAD_MANIFEST = "download_manifest.json"
LICENCE_FILE = "LICENCE.txt"
LICENCE_GATED = "; every requester reads it (`optctl access licence`) and accepts that text, by its sha256, with their request."


@dataclass(frozen=True)
class CardFacts:
    """What the card says beyond the config: measured or looked up at registration."""

    params: int
    report: EvalReport
    checks: list[Check]
    champion: Champion | None
    logbook: list[dict[str, Any]]
    licence: str


def render(cfg: Any, manifest: DatasetManifest, facts: CardFacts) -> str:
    """The card as Markdown (MLflow renders a version's description as Markdown)."""
    report, checks = facts.report, facts.checks
    return "\n".join(
        [
            f"# {cfg.model_name}",
            "",
            f"OPT-family decoder-only transformer (preset `{cfg.model.preset}`), {facts.params:,} parameters, trained by run "
            f"`{cfg.train.run}` for {report.step} steps on dataset `{manifest.dataset_id}`.",
            "",
            f"**Gate: {'PASSED' if passed_all(checks) else 'FAILED'}** · access class `{cfg.access_class}` · "
            + (f"compared with champion v{facts.champion.version}" if facts.champion else "no champion to compare with yet"),
            "",
            _lineage(manifest),
            _training(report.step, facts.logbook),
            _evaluation(report, facts.champion),
            _gate(checks),
            _use(cfg, facts.licence),
        ]
    )


def _lineage(m: DatasetManifest) -> str:
    rows = []
    for name, s in sorted(m.sources.items()):
        filtered = ", ".join(f"{k} {v}" for k, v in sorted(s.dropped.items())) or "0"
        rows.append(f"| {name} | {s.docs_in:,} | {s.exact_duplicates:,} | {s.near_duplicates:,} | {_cell(filtered)} | "
                    f"{s.train_docs:,} | {s.train_tokens:,} | {s.valid_tokens:,} | {m.weights.get(name, 1.0):g} |")  # fmt: skip
    inputs = "\n".join(
        f"- `{_cell(i.get('source', ''))}`: `{_cell(i['uri'])}` (sha256 `{str(i.get('sha256', ''))[:16]}...`)" for i in m.inputs
    )
    summary = m.near_summary()
    near = f"\n{summary[:1].upper()}{summary[1:]}.\n" if summary else ""
    return f"""## Data lineage
Dataset `{m.dataset_id}` at `{_cell(m.uri)}`: {m.train_tokens:,} training tokens, sequence length {m.seq_len},
vocabulary {m.vocab_size:,} (tokenizer sha256 `{m.tokenizer_sha256[:16]}...`).

| source | documents in | exact dups removed | near dups removed | filtered out | train docs | train tokens | valid tokens | weight |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{near}

Inputs:
{inputs}
"""


def _training(steps: int, events: list[dict[str, Any]]) -> str:
    from opt.logbook import totals

    if not events:
        return "## Training\nNo logbook was found for this run.\n"
    t = totals(events)
    started = next((e["ts"] for e in events if e["event"] == "run_started"), None)
    finished = [e["ts"] for e in events if e["event"] == "run_finished"]
    hosts = f"{len(t.hosts_lost)}" + (f" ({', '.join(_cell(h) for h in t.hosts_lost)})" if t.hosts_lost else "")
    return f"""## Training (from the run's logbook)
| steps | attempts | restarts | failed ranks | hosts lost | spike rollbacks | checkpoints | time lost | notes |
|---|---|---|---|---|---|---|---|---|
| {steps:,} | {t.attempts} | {t.restarts} | {t.failures} | {hosts} | {t.rollbacks} | {t.checkpoints} | {t.time_lost_s:.1f} s | {t.notes} |

Started {started or "?"}, finished {finished[-1] if finished else "?"} (UTC). The full logbook is the run's `logbook.md`.
"""


def _evaluation(report: EvalReport, champion: Champion | None) -> str:
    champ_ppl = f"{champion.perplexity:.2f}" if champion else "-"
    per_source = "\n".join(f"| {_cell(n)} | {m['perplexity']:.2f} | {int(m['tokens']):,} |" for n, m in sorted(report.per_source.items()))
    out = f"""## Evaluation
Validation perplexity {report.perplexity:.2f} over {report.tokens:,} tokens (champion: {champ_ppl}).

| source | perplexity | tokens |
|---|---|---|
{per_source}
"""
    if report.tasks:
        head = "champion v" + champion.version if champion else "champion"
        rows = []
        for task in sorted(report.tasks):
            scores, theirs = report.tasks[task], (champion.tasks.get(task, {}) if champion else {})
            for metric in sorted(k for k in scores if k != "n"):
                mine, other = scores[metric], theirs.get(metric)
                delta = f"{mine - other:+.4f}" if other is not None else "-"
                rows.append(f"| {_cell(task)} | {_cell(metric)} | {mine:.4f} | {'-' if other is None else f'{other:.4f}'} | {delta} | "
                            f"{int(scores.get('n', 0))} |")  # fmt: skip
        out += f"""
Tasks (lm-evaluation-harness; `acc_norm` is lm-eval's, per character; `acc_norm_tokens` is OPT's, per token):

| task | metric | this version | {head} | difference | questions |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    return out


def _gate(checks: list[Check]) -> str:
    def cell(v: object) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else _cell(v)

    rows = "\n".join(
        f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {cell(c.value)} | {cell(c.threshold)} | {cell(c.reason)} |" for c in checks
    )
    return f"""## Gate
{"PASSED" if passed_all(checks) else "FAILED"}: a version becomes `candidate` only if every check passes.

| check | verdict | value | threshold | reason |
|---|---|---|---|---|
{rows}
"""


def _use(cfg: Any, licence: str) -> str:
    gated = cfg.access_class == "gated"
    access = (
        "Gated: the weights are not in MLflow. Request access (`optctl access request`); once a reviewer approves, "
        "`optctl access download` fetches them from the access service, signature and sha256 verified."
        if gated
        else "Open download (`optctl registry fetch`)."
    )
    title = next((line.strip() for line in licence.splitlines() if line.strip()), "")
    return f"""## Intended use
{cfg.registry.intended_use}

## Licence
{_cell(title)}. The full text is `{LICENCE_FILE}` beside the weights{LICENCE_GATED if gated else "."}

## Limitations
{cfg.registry.limitations}

## Access
Access class `{cfg.access_class}`. {access}

## Files
`consolidated/` (our format: `config.json`, `model.safetensors`), `hf/` (loads with
`transformers.OPTForCausalLM.from_pretrained`), and `{DOWNLOAD_MANIFEST}` (size and sha256 of every file).
"""


def _cell(v: object) -> str:
    # one Markdown table cell or inline span: no newlines, no column separators
    return str(v).replace("\n", " ").replace("|", "\\|")
