"""`optctl deploy`, `optctl review ...`, `optctl stack up` and `optctl access housekeeping`: scheduled operation.

`deploy` and `review` talk to the Prefect server at `$PREFECT_API_URL` (`optctl stack up` prints it); without
one they say so in a line instead of starting Prefect's throwaway server, where a deployment would vanish.
"""

from __future__ import annotations

import argparse
import getpass
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opt.errors import OptError


def _load(args: argparse.Namespace) -> Any:
    from opt.cli import _load as load

    return load(args)


def need_prefect_server() -> str:
    """The Prefect API URL, checked to answer; OptError in one line when unset or unreachable."""
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise OptError("PREFECT_API_URL is not set: start the stack (`make serve`, which prints it) or point it at your Prefect server")
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise OptError(f"the Prefect server at {url} does not answer ({type(e).__name__}); is `make serve` running?") from None
    return url


def cmd_deploy(args: argparse.Namespace) -> None:
    cfg = _load(args)
    url = need_prefect_server()
    from flows.deployments import deploy

    registered = deploy(cfg, args.config, list(args.overrides), Path.cwd())
    print(f"registered {len(registered)} deployments in work pool {cfg.schedule.work_pool!r} at {url}:")
    for d in registered:
        print(f"  {d['name']:<48} {d['schedule']}")
    print(f"run them with a worker: prefect worker start --pool {cfg.schedule.work_pool}  (`make serve` starts one)")
    print("pause or resume a schedule: prefect deployment schedule pause|resume <flow>/<deployment> <schedule id>, or the UI")


def cmd_review_list(args: argparse.Namespace) -> None:
    from opt.ops.review import waiting

    cfg = _load(args)
    rows = waiting(cfg.tracking.uri, args.model or cfg.model_name)
    if not rows:
        print(f"no version of {args.model or cfg.model_name} waits for a review")
        return
    print(f"{'version':<8} {'step':>6} {'perplexity':>11}  flow run")
    for r in rows:
        print(f"{r['version']:<8} {r['step']:>6} {r['perplexity']:>11}  {r['flow_run']}")


def _decide(args: argparse.Namespace, decision: str) -> None:
    from pydantic import ValidationError

    from flows.review import decide
    from opt.ops.review import ReviewDecision

    cfg = _load(args)
    need_prefect_server()
    try:
        d = ReviewDecision(decision=decision, reviewer=args.by or getpass.getuser(), reason=args.reason)  # type: ignore[arg-type]
    except ValidationError as e:
        raise OptError(f"review: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
    flow_run = decide(cfg.tracking.uri, args.name, args.version, d)
    print(f"{args.name} v{args.version}: {decision} by {d.reviewer} sent to flow run {flow_run}; it records the decision as it resumes")


def cmd_stack_up(args: argparse.Namespace) -> None:
    from opt.ops.stack import Stack

    cfg = _load(args)
    Stack(cfg, args.config, list(args.overrides), Path(args.home), deploy=not args.no_deploy, prefect_port=args.prefect_port,
          mlflow_port=args.mlflow_port).run()  # fmt: skip


def add_ops_commands(sub: Any, config_args: Callable[..., None]) -> None:
    p = sub.add_parser("deploy", help="register the Prefect deployments and their schedules (needs PREFECT_API_URL)")
    config_args(p, run=True)
    p.set_defaults(func=cmd_deploy)

    review = sub.add_parser("review", help="decide on versions waiting for a reviewer").add_subparsers(dest="review_cmd", required=True)
    p = review.add_parser("list", help="versions waiting for a review")
    config_args(p)
    p.add_argument("--model", help="registered model (default: the config's)")
    p.set_defaults(func=cmd_review_list)
    for decision, verb in (("approve", "approve: the version becomes champion"), ("reject", "reject: it stays a candidate")):
        p = review.add_parser(decision, help=verb)
        config_args(p)
        p.add_argument("name", help="registered model name")
        p.add_argument("version")
        p.add_argument("--reason", required=True, help="what you checked and found (recorded on the version)")
        p.add_argument("--by", help="who decides (default: your login name)")
        p.set_defaults(func=lambda a, d=decision: _decide(a, d))

    stack = sub.add_parser("stack", help="the local stack").add_subparsers(dest="stack_cmd", required=True)
    p = stack.add_parser("up", help="Prefect server + worker, MLflow server, access service; Ctrl-C stops them all")
    config_args(p)
    p.add_argument("--home", default=".opt/stack", help="where the servers keep their state and logs")
    p.add_argument("--no-deploy", action="store_true", help="do not register the deployments")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000, help="the access service's port comes from access.url")
    p.set_defaults(func=cmd_stack_up)
