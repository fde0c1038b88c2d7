"""`optctl`: every stage from the command line. Errors print one line (no traceback) and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from typing import Any

from opt.errors import OptError


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is what --help is for); sub-commands inherit it."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _config_args(p: argparse.ArgumentParser, run: bool = False, step: bool = False) -> None:
    p.add_argument("--config", "-c", help="run configuration YAML (default: embedded defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    if run:
        p.add_argument("--run", help="run name (overrides train.run)")
    if step:
        p.add_argument("--step", type=int, help="checkpoint step (default: newest committed)")


def _load(args: argparse.Namespace) -> Any:
    from opt.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "run", None):
        overrides.append(f"train.run={args.run}")
    return load_config(args.config, overrides)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --- data / train / eval / register ------------------------------------------------------------------


def cmd_data_prep(args: argparse.Namespace) -> None:
    from opt import stages
    from opt.data.config import parse_source_spec

    if args.source:
        taken: set[str] = set()
        try:
            specs = [parse_source_spec(s, taken) for s in args.source]
        except ValueError as e:
            raise OptError(str(e)) from None
        args.overrides.append(f"data.sources={json.dumps(specs)}")
    if args.out:
        args.overrides.append(f"storage.root={args.out}")
    if args.workers is not None:
        args.overrides.append(f"data.workers={args.workers}")
    cfg = _load(args)
    manifest, reused = stages.prepare_data(cfg, progress=not args.no_progress and sys.stderr.isatty())
    print(f"dataset {manifest.dataset_id} {'(reused)' if reused else '(prepared)'}: {manifest.uri}")
    header = ("source", "docs in", "dropped", "exact dup", "near dup", "train docs", "valid docs", "train tok", "valid tok")
    print(f"{header[0]:<20}" + "".join(f"{h:>12}" for h in header[1:]))
    for name, s in manifest.sources.items():
        row = (s.docs_in, sum(s.dropped.values()), s.exact_duplicates, s.near_duplicates, s.train_docs, s.valid_docs,
               s.train_tokens, s.valid_tokens)  # fmt: skip
        print(f"{name:<20}" + "".join(f"{v:>12,}" for v in row))
        if s.dropped:
            print(f"{'':<20}  dropped: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s.dropped.items())))


def cmd_train(args: argparse.Namespace) -> None:
    from opt import stages

    cfg = _load(args)
    result = stages.train(cfg)
    print(f"run {cfg.train.run}: committed checkpoint {result.checkpoint.uri} (step {result.checkpoint.step})")


def cmd_eval(args: argparse.Namespace) -> None:
    from opt import stages

    report = stages.evaluate(_load(args), args.step)
    print(f"step {report.step}: validation perplexity {report.perplexity:.2f} over {report.tokens} tokens -> {report.checkpoint}/eval.json")
    _print_tasks(report.tasks)


def _print_tasks(tasks: dict[str, dict[str, float]]) -> None:
    for task, metrics in sorted(tasks.items()):
        print(f"  {task:<24} " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))


def cmd_eval_pending(args: argparse.Namespace) -> None:
    import time

    from opt import stages

    cfg = _load(args)
    while True:
        for report in stages.evaluate_pending(cfg, args.every):
            print(f"step {report.step}: validation perplexity {report.perplexity:.2f} -> {report.checkpoint}/eval.json", flush=True)
            _print_tasks(report.tasks)
        if args.watch is None:
            return
        time.sleep(args.watch)


def cmd_eval_tasks(args: argparse.Namespace) -> None:
    from pathlib import Path

    from opt.eval.harness import harness_lm_class
    from opt.eval.suite import run_tasks, summary, write_results

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise OptError("--tasks names no task; give lm-eval task names separated by commas (e.g. pydocs_choice,pydocs_cloze)")
    try:
        lm = harness_lm_class()(checkpoint=args.checkpoint, cache_dir=str(Path(os.environ.get("OPT_HOME", ".opt")) / "cache" / "eval"))
    except ValueError as e:
        raise OptError(str(e)) from None
    results = run_tasks(lm, names, args.include_path, args.num_fewshot, args.limit)
    print(f"lm-eval results in {write_results(results, args.out)}")
    _print_tasks(summary(results))


def cmd_register(args: argparse.Namespace) -> None:
    from opt import stages

    reg = stages.register(_load(args), args.step)
    verdict = "passed" if reg.gate_passed else "FAILED"
    print(
        f"{reg.name} v{reg.version}: gate {verdict} ({'; '.join(reg.reasons)}); aliases {reg.aliases or 'none'}; access {reg.access_class}"
    )


def cmd_pipeline(args: argparse.Namespace) -> None:
    cfg = _load(args)  # validate before starting Prefect, so a bad config fails in a second
    if args.no_prefect:
        from opt import stages

        s = stages.run_all(cfg)
        summary = {
            "dataset": {"id": s.dataset.dataset_id, "uri": s.dataset.uri, "reused": s.dataset_reused},
            "train": {"run_uri": s.train.run_uri, "step": s.train.checkpoint.step, "checkpoint": s.train.checkpoint.uri},
            "eval": {"perplexity": s.eval.perplexity, "tasks": s.eval.tasks},
            "registration": {"name": s.registration.name, "version": s.registration.version, "gate_passed": s.registration.gate_passed,
                             "aliases": s.registration.aliases, "access_class": s.registration.access_class},
        }  # fmt: skip
    else:
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        from flows.pipeline import pipeline

        summary = pipeline(args.config, list(args.overrides) + ([f"train.run={args.run}"] if args.run else []))
    _print_json(summary)
    _where_to_look(cfg, summary)


def _where_to_look(cfg: Any, summary: dict) -> None:
    from opt.tracking import ui_links

    reg = summary["registration"]
    print("\nWhere to look:")
    print(f"  dataset manifest   {summary['dataset']['uri']}/manifest.json")
    print(f"  run + checkpoints  {summary['train']['run_uri']}  (logbook: optctl logbook show {cfg.train.run})")
    print(f"  eval report        {summary['train']['checkpoint']}/eval.json")
    verdict = "passed" if reg["gate_passed"] else "failed"
    print(f"  registered model   {reg['name']} v{reg['version']} (gate {verdict}, aliases {reg['aliases']}, access {reg['access_class']})")
    print(f"  MLflow UI          .venv/bin/mlflow ui --backend-store-uri {cfg.tracking.uri} --port 5000, then open")
    for url, what in ui_links("http://127.0.0.1:5000", cfg.tracking.uri, cfg.tracking.experiment, reg["name"], reg["version"]):
        print(f"                     {url}  ({what})")


# --- model ---------------------------------------------------------------------------------------------


def cmd_model_info(args: argparse.Namespace) -> None:
    from opt.model import OPTConfig
    from opt.model.plan import describe, memory_per_gpu

    cfg = OPTConfig.preset(args.preset)
    plan = memory_per_gpu(cfg, args.gpus, args.tp, args.sharding, args.micro_batch, args.seq_len, not args.no_activation_checkpointing)
    print(describe(args.preset, cfg, plan, args.seq_len))


def cmd_import_hf(args: argparse.Namespace) -> None:
    from opt.model.hf import import_hf

    print(f"wrote {import_hf(args.src, args.dst)}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from opt.model.hf import export_hf

    print(f"wrote {export_hf(args.src, args.dst, args.tokenizer)}")


def cmd_model_export(args: argparse.Namespace) -> None:
    from opt import stages
    from opt.train.export import export_consolidated
    from opt.train.job import work_dir

    cfg = _load(args)
    ckpt = stages.checkpoint(cfg, args.step)
    print(f"wrote {export_consolidated(ckpt, args.out, work_dir(cfg) / 'cache')} from {ckpt.uri}")


# --- plan ----------------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> None:
    from opt.train.reliability import format_plan, plan_for

    cfg = _load(args)
    given = {
        "hosts": args.hosts,
        "gpus_per_host": args.gpus_per_host,
        "host_failures_per_day": args.failures_per_day,
        "checkpoint_s": args.checkpoint_s,
        "restart_s": args.restart_s,
        "mfu": args.mfu,
        "peak_tflops": args.peak_tflops,
        "write_gb_per_s_per_host": args.write_gb_per_s,
        "trials": args.trials,
    }
    try:  # unset flags keep plan_for's OPT-175B defaults
        plan = plan_for(cfg, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise OptError(str(e)) from None
    print(format_plan(plan))
    print(json.dumps(plan.to_dict(), sort_keys=True))


# --- logbook -------------------------------------------------------------------------------------------


def cmd_logbook_show(args: argparse.Namespace) -> None:
    from opt import storage
    from opt.logbook import Logbook, render_markdown

    cfg = _load(args)
    book = Logbook(storage.join(cfg.storage.root, "runs", args.run_name))
    events = book.read()
    if not events:
        raise OptError(f"run {args.run_name!r} has no logbook at {book.uri}")
    print(render_markdown(args.run_name, events))


def cmd_registry_promote(args: argparse.Namespace) -> None:
    import getpass

    from opt.registry.promote import promote

    cfg = _load(args)
    entry = promote(cfg.tracking.uri, args.name, args.version, args.alias, args.reason, args.override, args.by or getpass.getuser(),
                    cfg.access)  # fmt: skip
    was = f" (was v{entry['previous']})" if entry["previous"] else ""
    forced = f"; gates overridden: {entry['override']}" if entry["override"] else ""
    print(f"{args.name} v{args.version} is now {args.alias}{was}, by {entry['by']} at {entry['at']}{forced}")


def cmd_registry_compare(args: argparse.Namespace) -> None:
    from opt.access.names import terminal_safe
    from opt.registry.promote import compare

    rows = compare(_load(args).tracking.uri, args.name, args.a, args.b)
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'v' + args.a:<14} v{args.b}")
    for key, a, b in rows:
        print(f"{terminal_safe(key):<{width}}  {terminal_safe(a):<14} {terminal_safe(b)}")


def cmd_registry_history(args: argparse.Namespace) -> None:
    from opt.registry.promote import history_of

    for e in history_of(_load(args).tracking.uri, args.name, args.alias):
        forced = f" OVERRIDE: {e['override']}" if e.get("override") else ""
        print(f"{e['at']}  v{e['version']:<5} by {e['by']:<16} {e['reason']}{forced}")


def cmd_logbook_note(args: argparse.Namespace) -> None:
    from opt import storage
    from opt.logbook import Logbook

    cfg = _load(args)
    entry = Logbook(storage.join(cfg.storage.root, "runs", args.run_name)).append(
        "note", text=args.text, author=os.environ.get("USER", "unknown")
    )
    print(f"noted at {entry['ts']}")


# --- parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optctl", description="Prepare, train, evaluate, register and gate OPT models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("prep", help="clean, deduplicate, tokenize and pack the configured sources")
    _config_args(p)
    p.add_argument("--source", action="append", default=[], metavar="[NAME=]KIND:URI",
                   help="replace the configured sources: pile:URI, reddit:URI or text:URI (repeatable)")  # fmt: skip
    p.add_argument("--out", help="store URI the dataset goes under (<out>/datasets/<id>/); default storage.root")
    p.add_argument("--workers", type=int, help="processes (default: data.workers, 0 = one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data_prep)

    p = sub.add_parser("train", help="start or resume a training run on Ray")
    _config_args(p, run=True)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="validation perplexity and the configured lm-eval tasks of a committed checkpoint")
    _config_args(p, run=True, step=True)
    p.set_defaults(func=cmd_eval)
    evals = p.add_subparsers(dest="eval_cmd")
    t = evals.add_parser("tasks", help="lm-eval tasks on a checkpoint (a committed one or a consolidated export)")
    t.add_argument("--checkpoint", required=True, help="a committed step-N URI or a consolidated export folder")
    t.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated (bundled: pydocs_cloze, pydocs_choice)")
    t.add_argument("--include-path", help="a folder of extra task YAMLs")
    t.add_argument("--num-fewshot", type=int)
    t.add_argument("--limit", type=int, help="documents per task")
    t.add_argument("--out", required=True, help="where to write lm-eval's results JSON")
    t.set_defaults(func=cmd_eval_tasks)
    t = evals.add_parser("pending", help="evaluate committed checkpoints without eval.json (beside training, never inside it)")
    _config_args(t, run=True)
    t.add_argument("--every", type=int, default=1, help="every N-th committed checkpoint (the newest always)")
    t.add_argument("--watch", type=float, metavar="SECONDS", help="keep looking every SECONDS (Ctrl-C stops)")
    t.set_defaults(func=cmd_eval_pending)
    p = sub.add_parser("register", help="register an evaluated checkpoint in MLflow behind its gate")
    _config_args(p, run=True, step=True)
    p.set_defaults(func=cmd_register)

    pipe = sub.add_parser("pipeline", help="the whole pipeline").add_subparsers(dest="pipeline_cmd", required=True)
    p = pipe.add_parser("run", help="data prep -> train -> eval -> register, as a Prefect flow")
    _config_args(p, run=True)
    p.add_argument("--no-prefect", action="store_true", help="run the stages directly, without Prefect")
    p.set_defaults(func=cmd_pipeline)

    model = sub.add_parser("model", help="model presets, planning and conversion").add_subparsers(dest="model_cmd", required=True)
    p = model.add_parser("info", help="parameters, FLOPs per token and memory per GPU of a preset")
    p.add_argument("preset")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--sharding", default="full", choices=["full", "grad_op", "none"])
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.set_defaults(func=cmd_model_info)
    p = model.add_parser("import-hf", help="Hugging Face save_pretrained dir -> consolidated checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_import_hf)
    p = model.add_parser("export-hf", help="consolidated checkpoint -> Hugging Face dir")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--tokenizer", help="tokenizer.json to ship with the export")
    p.set_defaults(func=cmd_export_hf)
    p = model.add_parser("export", help="sharded training checkpoint -> consolidated checkpoint")
    _config_args(p, run=True, step=True)
    p.add_argument("out")
    p.set_defaults(func=cmd_model_export)

    p = sub.add_parser("plan", help="checkpoint interval and goodput under host failures at cluster scale (default: OPT-175B's)")
    _config_args(p)
    p.add_argument("--hosts", type=int, help="hosts in the cluster (default 124, OPT-175B's)")
    p.add_argument("--gpus-per-host", type=int, help="GPUs per host (default 8)")
    p.add_argument("--failures-per-day", type=float, help="failures per HOST per day (default 2/124: OPT-175B's ~2 a day over 124 hosts)")
    p.add_argument("--checkpoint-s", type=float, help="seconds to write a checkpoint (default: state size / write bandwidth)")
    p.add_argument("--write-gb-per-s", type=float, help="checkpoint write bandwidth per host in GB/s, for the estimate (default 1)")
    p.add_argument("--restart-s", type=float, help="seconds from a failure to training again (default 600)")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation (default 0.45)")
    p.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s per GPU (default 312, A100 bf16)")
    p.add_argument("--trials", type=int, help="Monte Carlo trials (default 1000)")
    p.set_defaults(func=cmd_plan)

    reg = sub.add_parser("registry", help="promotion and comparison of registered versions").add_subparsers(
        dest="registry_cmd", required=True
    )
    p = reg.add_parser("promote", help="point an alias (champion) at a version, recording who, when and why")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="champion")
    p.add_argument("--reason", required=True)
    p.add_argument("--override", metavar="REASON", help="promote a version whose gates failed, and say why")
    p.add_argument("--by", help="who promotes (default: your login name)")
    _config_args(p)
    p.set_defaults(func=cmd_registry_promote)
    p = reg.add_parser("compare", help="two versions side by side: every task, check and tag")
    p.add_argument("name")
    p.add_argument("a")
    p.add_argument("b")
    _config_args(p)
    p.set_defaults(func=cmd_registry_compare)
    p = reg.add_parser("history", help="every promotion to an alias, oldest first")
    p.add_argument("name")
    p.add_argument("--alias", default="champion")
    _config_args(p)
    p.set_defaults(func=cmd_registry_history)

    book = sub.add_parser("logbook", help="the run logbook").add_subparsers(dest="logbook_cmd", required=True)
    p = book.add_parser("show", help="render a run's logbook as Markdown")
    p.add_argument("run_name")
    _config_args(p)
    p.set_defaults(func=cmd_logbook_show)
    p = book.add_parser("note", help="add a note to a run's logbook")
    p.add_argument("run_name")
    p.add_argument("text")
    _config_args(p)
    p.set_defaults(func=cmd_logbook_note)

    from opt.access.cli import add_access_commands

    add_access_commands(sub, _config_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's client logs every API call at INFO
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from opt.train.interrupts import TrainingInterrupted

    try:
        args.func(args)
    except TrainingInterrupted as e:  # not an error: what stopped, what survived, how to go on
        print(str(e), file=sys.stderr)
        return e.exit_code
    except OptError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; committed checkpoints and prepared data are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
