"""`optctl`: every stage from the command line. Errors print one line (no traceback) and exit 2."""

from __future__ import annotations

import argparse
import json
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
        from opt.cli_tools import writable_folder

        writable_folder(args.out, "--out")
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
    if (near := manifest.near_summary()) is not None:
        print(near)


def cmd_train(args: argparse.Namespace) -> None:
    from opt import stages

    cfg = _load(args)
    result = stages.train(cfg)
    print(f"run {cfg.train.run}: committed checkpoint {result.checkpoint.uri} (step {result.checkpoint.step})")
    from opt.console import log_file

    if (path := log_file()) is not None:
        print(f"log: {path}")


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

    from opt.cli_tools import writable_folder
    from opt.eval.harness import harness_lm_class
    from opt.eval.suite import run_tasks, summary, write_results

    if Path(args.out).is_dir():
        raise OptError(f"--out {args.out} is a folder; name the results file, e.g. {Path(args.out) / 'results.json'}")
    writable_folder(str(Path(args.out).parent), "--out")
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
    if args.json:
        _print_json(summary)
        return
    _print_summary(summary)
    _where_to_look(cfg, summary)


def _print_summary(summary: dict) -> None:
    """The figures that matter, as lines a person reads (`--json` prints the whole summary instead)."""
    d, t, e, r = summary["dataset"], summary["train"], summary["eval"], summary["registration"]
    print(f"\ndataset     {d['id']} ({'reused' if d['reused'] else 'prepared'})")
    print(f"training    step {t['step']}: {t['checkpoint']}")
    print(f"evaluation  validation perplexity {e['perplexity']:.2f}")
    tasks = e.get("tasks") or {}
    for task, m in sorted(tasks.items()):
        print(f"            {task:<20} " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(m.items()) if k != "n"))
    verdict = "passed" if r["gate_passed"] else "FAILED: " + "; ".join(r.get("reasons") or [])
    print(
        f"registered  {r['name']} v{r['version']}: gate {verdict}; aliases {', '.join(r['aliases']) or 'none'}; access {r['access_class']}"
    )


def _where_to_look(cfg: Any, summary: dict) -> None:
    from opt.tracking import ui_links

    reg = summary["registration"]
    from opt.console import log_file

    print("\nWhere to look:")
    print(f"  dataset manifest   {summary['dataset']['uri']}/manifest.json")
    print(f"  run + checkpoints  {summary['train']['run_uri']}  (logbook: optctl logbook show {cfg.train.run})")
    print(f"  eval report        {summary['train']['checkpoint']}/eval.json")
    verdict = "passed" if reg["gate_passed"] else "failed"
    print(f"  registered model   {reg['name']} v{reg['version']} (gate {verdict}, aliases {reg['aliases']}, access {reg['access_class']})")
    print(f"  MLflow UI          .venv/bin/mlflow ui --backend-store-uri {cfg.tracking.uri} --port 5000, then open")
    for url, what in ui_links("http://127.0.0.1:5000", cfg.tracking.uri, cfg.tracking.experiment, reg["name"], reg["version"]):
        print(f"                     {url}  ({what})")
    if (path := log_file()) is not None:
        print(f"  this command's log {path}  (Ray, Prefect and MLflow output; -v shows it here)")


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
    bundled = "pydocs_cloze, pydocs_choice, pydocs_story"
    t.add_argument("--tasks", required=True, help=f"lm-eval task names, comma-separated (bundled: {bundled})")
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
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON instead")
    p.set_defaults(func=cmd_pipeline)

    from opt.cli_tools import add_tool_commands

    add_tool_commands(sub, _config_args)
    from opt.access.cli import add_access_commands

    add_access_commands(sub, _config_args)
    from opt.ops.cli import add_ops_commands

    add_ops_commands(sub, _config_args)
    return parser


VERBOSE_FLAGS = ("-v", "--verbose")


def _split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """`-v/--verbose` anywhere on the line (before a `--`), not only before the subcommand."""
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a not in VERBOSE_FLAGS] + argv[end:]
    return rest, len(rest) != len(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, verbose = _split_verbose(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    args.verbose = args.verbose or verbose
    from opt.console import command

    with command(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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
    except BrokenPipeError:  # `optctl ... | head`: the reader is gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a path the command could not read or write: which one, and why
        if args.verbose:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path (or run with -v for details)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; committed checkpoints and prepared data are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
