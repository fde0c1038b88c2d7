"""`optctl` commands beside the stages: model presets and conversion, planning, the logbook, the registry, the config.

Each refuses bad input in one line (OptError, exit 2) before it writes anything.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opt.errors import OptError


def _load(args: argparse.Namespace) -> Any:
    from opt.cli import _load as load

    return load(args)


def writable_folder(path: str, flag: str) -> Path | None:
    """Refuse, in one line and before any work, an output folder that cannot be made or written; None for URIs."""
    import tempfile

    from opt import storage

    if storage.is_uri(path):
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OptError(f"{flag} {path} is a file, not a folder; name a folder (it is made if missing)")
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise OptError(f"{flag} {path}: {q} is a file, so no folder can be made under it; name another folder")
    try:
        tempfile.TemporaryDirectory(dir=q, prefix=".optctl-probe-").cleanup()
    except OSError as e:
        raise OptError(f"{flag} {path}: cannot write under {q} ({e.strerror or e}); name a folder you can write") from None
    return p


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def export_folder(path: str, flag: str) -> None:
    """An export is a folder (config.json + model.safetensors): refuse a file-like name before writing."""
    if Path(path).suffix.lower() in WEIGHT_SUFFIXES and not Path(path).is_dir():
        raise OptError(f"{flag} {path}: an export is a folder (config.json + model.safetensors), not one file; "
                       f"name a folder, e.g. {Path(path).with_suffix('')}")  # fmt: skip
    writable_folder(path, flag)


# --- model ---------------------------------------------------------------------------------------------


def cmd_model_info(args: argparse.Namespace) -> None:
    from opt.model import OPTConfig
    from opt.model.plan import describe, memory_per_gpu

    try:
        cfg = OPTConfig.preset(args.preset)
    except ValueError as e:
        raise OptError(str(e)) from None
    plan = memory_per_gpu(cfg, args.gpus, args.tp, args.sharding, args.micro_batch, args.seq_len, not args.no_activation_checkpointing)
    print(describe(args.preset, cfg, plan, args.seq_len))


def cmd_import_hf(args: argparse.Namespace) -> None:
    from opt.model.hf import import_hf

    export_folder(args.dst, "DST")
    print(f"wrote {import_hf(args.src, args.dst)}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from opt.model.hf import TOKENIZER_JSON, export_hf

    export_folder(args.dst, "DST")
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        raise OptError(f"--tokenizer {args.tokenizer}: no such file; pass the dataset's tokenizer/tokenizer.json")
    print(f"wrote {export_hf(args.src, args.dst, args.tokenizer)}")
    if args.tokenizer is None and not (Path(args.src) / TOKENIZER_JSON).is_file():
        print(f"note: no tokenizer in {args.src} and no --tokenizer: the export cannot tokenize text (lm-eval, pipelines); "
              "pass --tokenizer <dataset>/tokenizer/tokenizer.json to ship one")  # fmt: skip


def cmd_model_export(args: argparse.Namespace) -> None:
    from opt import stages
    from opt.train.export import export_consolidated
    from opt.train.job import work_dir

    export_folder(args.out, "OUT")
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
    print(json.dumps(plan.to_dict(), sort_keys=True) if args.json else format_plan(plan))


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
    import getpass

    from opt import storage
    from opt.logbook import Logbook
    from opt.train.job import RUN_FILE

    cfg = _load(args)
    run = storage.join(cfg.storage.root, "runs", args.run_name)
    book = Logbook(run)
    if not storage.exists(storage.join(run, RUN_FILE)) and not book.read():
        raise OptError(f"no run {args.run_name!r} under {storage.join(cfg.storage.root, 'runs')}; check the name "
                       "(or --config / storage.root): a note goes to a run that exists")  # fmt: skip
    if not args.text.strip():
        raise OptError("the note is empty; say what happened")
    entry = book.append("note", text=args.text, author=args.author or getpass.getuser())
    print(f"noted in {args.run_name} at {entry['ts']} by {entry['author']}")


# --- config --------------------------------------------------------------------------------------------


def config_keys(section: str | None = None) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every configuration key, optionally under `section`."""
    from pydantic import BaseModel

    from opt.config import RunConfig

    def type_name(annotation: Any) -> str:
        return getattr(annotation, "__name__", None) if isinstance(annotation, type) else str(annotation).replace("typing.", "")  # type: ignore[return-value]

    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
                continue
            default = f.get_default(call_default_factory=True)
            rows.append(
                (
                    key,
                    type_name(ann),
                    json.dumps(default, default=lambda o: o.model_dump(mode="json") if isinstance(o, BaseModel) else str(o)),
                    " ".join((f.description or "").split()),
                )
            )

    walk(RunConfig, "")
    if section:
        rows = [r for r in rows if r[0] == section or r[0].startswith(section.rstrip(".") + ".")]
        if not rows:
            sections = sorted({r[0].split(".")[0] for r in config_keys()})
            raise OptError(f"no configuration keys under {section!r}; sections: {', '.join(sections)}")
    return rows


def cmd_config_keys(args: argparse.Namespace) -> None:
    for key, typ, default, doc in config_keys(args.section):
        print(f"{key}  ({typ}, default {default})")
        if doc:
            print(f"    {doc}")


def cmd_config_show(args: argparse.Namespace) -> None:
    print(_load(args).to_yaml(), end="")


def add_tool_commands(sub: Any, config_args: Callable[..., None]) -> None:
    _config_args = config_args
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
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
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
    p.add_argument("--author", help="who writes it (default: your login name)")
    _config_args(p)
    p.set_defaults(func=cmd_logbook_note)

    conf = sub.add_parser("config", help="configuration keys and the resolved configuration").add_subparsers(
        dest="config_cmd", required=True
    )
    p = conf.add_parser("keys", help="every configuration key with its type, default and meaning")
    p.add_argument("section", nargs="?", help="only keys under this section (e.g. train, registry.gate)")
    p.set_defaults(func=cmd_config_keys)
    p = conf.add_parser("show", help="the resolved configuration (defaults, --config file and --set overrides) as YAML")
    _config_args(p, run=True)
    p.set_defaults(func=cmd_config_show)
