"""`optctl access ...`: file, review and use access requests for gated model versions."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _service(cfg: Any) -> Any:
    from opt.access.service import AccessService
    from opt.train.job import work_dir

    return AccessService.from_config(cfg.access, work_dir(cfg))


def cmd_request(args: argparse.Namespace, cfg: Any) -> None:
    from opt.access.download import require_gated_version

    require_gated_version(cfg.tracking.uri, args.model, args.version)
    req = _service(cfg).request_access(args.user, args.email, args.affiliation, args.purpose, args.model, args.version)
    print(f"request {req.id} filed for {req.model_name} v{req.model_version}; a reviewer approves it with "
          f"`optctl access approve {req.id} --reviewer NAME`")  # fmt: skip


def cmd_list(args: argparse.Namespace, cfg: Any) -> None:
    rows = _service(cfg).list_requests(args.status)
    print(f"{'id':>4} {'status':<9} {'requester':<16} {'model':<20} {'version':>7}  affiliation")
    for r in rows:
        print(f"{r.id:>4} {r.status:<9} {r.requester:<16} {r.model_name:<20} {r.model_version:>7}  {r.affiliation}")


def cmd_approve(args: argparse.Namespace, cfg: Any) -> None:
    grant = _service(cfg).approve(args.request_id, args.reviewer, args.days, args.quota)
    print(f"grant {grant.id}: expires {grant.expires_at:%Y-%m-%d %H:%M} UTC, {grant.download_quota} downloads; "
          f"the requester gets a link with `optctl access link {grant.id} --user NAME`")  # fmt: skip


def cmd_deny(args: argparse.Namespace, cfg: Any) -> None:
    req = _service(cfg).deny(args.request_id, args.reviewer, args.reason)
    print(f"request {req.id} denied")


def cmd_revoke(args: argparse.Namespace, cfg: Any) -> None:
    grant = _service(cfg).revoke(args.grant_id, args.actor, args.reason)
    print(f"grant {grant.id} revoked; its links stop working now")


def cmd_link(args: argparse.Namespace, cfg: Any) -> None:
    link = _service(cfg).issue_link(args.grant_id, args.user)
    print(link.url)
    print(f"expires {link.expires_at:%Y-%m-%d %H:%M:%S} UTC", flush=True)


def cmd_download(args: argparse.Namespace, cfg: Any) -> None:
    from opt.access.download import download

    files = download(_service(cfg), cfg.tracking.uri, args.token, args.model, args.version, Path(args.out))
    print(f"{len(files)} files, {sum(f['size'] for f in files):,} bytes, sha256-verified, in {args.out}")


def cmd_audit(args: argparse.Namespace, cfg: Any) -> None:
    for e in _service(cfg).audit(args.subject):
        print(f"{e.at:%Y-%m-%d %H:%M:%S} {e.actor:<16} {e.action:<20} {e.subject:<12} {e.detail}")


def cmd_demo(args: argparse.Namespace, cfg: Any) -> None:
    """Walk through the gated workflow on the newest registered version of the configured model."""
    import tempfile

    from opt.access.download import download, require_gated_version
    from opt.access.links import AccessDenied
    from opt.errors import OptError
    from opt.tracking import client

    name = cfg.model_name
    versions = client(cfg.tracking.uri).search_model_versions(f"name = '{name}'")
    if not versions:
        raise OptError(f"no registered versions of {name}; run `optctl pipeline run` first")
    version = str(max(int(v.version) for v in versions))
    require_gated_version(cfg.tracking.uri, name, version)
    svc = _service(cfg)
    print(f"\nAccess workflow on gated {name} v{version}:")
    req = svc.request_access("demo-researcher", "researcher@university.edu", "Demo University",
                             "Reproduce the OPT evaluation on held-out Python documentation", name, version)  # fmt: skip
    print(f"  1. researcher files request {req.id} (pending)")
    if svc.grant_for_request(req.id) is None:
        print("  2. until a reviewer approves there is no grant, so no download link can be issued")
    grant = svc.approve(req.id, "demo-reviewer")
    print(f"  3. reviewer approves: grant {grant.id}, {grant.download_quota} downloads until {grant.expires_at:%Y-%m-%d}")
    link = svc.issue_link(grant.id, "demo-researcher")
    print(f"  4. researcher gets a link valid until {link.expires_at:%H:%M:%S} UTC")
    with tempfile.TemporaryDirectory() as tmp:
        files = download(svc, cfg.tracking.uri, link.token, name, version, Path(tmp))
        print(f"  5. download: {len(files)} files, sha256-verified")
        tampered = link.token[:-2] + ("AA" if not link.token.endswith("AA") else "BB")
        try:
            download(svc, cfg.tracking.uri, tampered, name, version, Path(tmp) / "x")
        except AccessDenied as e:
            print(f"  6. a tampered link is refused: {e.reason}")
        else:
            raise OptError("access demo: a tampered link was accepted; the access gate is broken")
        svc.revoke(grant.id, "demo-reviewer", "demo finished")
        try:
            download(svc, cfg.tracking.uri, link.token, name, version, Path(tmp) / "y")
        except AccessDenied as e:
            print(f"  7. after revocation the same link is refused at once: {e.reason}")
        else:
            raise OptError("access demo: a revoked grant's link still worked; the access gate is broken")
    print("  every step is in the audit log: optctl access audit")


def add_access_commands(sub: Any, config_args: Callable[..., None], load: Callable[[argparse.Namespace], Any]) -> None:
    access = sub.add_parser("access", help="access requests for gated model versions").add_subparsers(dest="access_cmd", required=True)

    def add(name: str, func: Callable[[argparse.Namespace, Any], None], help: str) -> argparse.ArgumentParser:
        p = access.add_parser(name, help=help)
        config_args(p)
        p.set_defaults(func=lambda args: func(args, load(args)))
        return p

    p = add("request", cmd_request, "file a request to download a gated model version")
    p.add_argument("--model", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--email", required=True)
    p.add_argument("--affiliation", required=True)
    p.add_argument("--purpose", required=True, help="intended research use (at least 20 characters)")
    p = add("list", cmd_list, "list requests")
    p.add_argument("--status", choices=["pending", "approved", "denied", "revoked"])
    p = add("approve", cmd_approve, "approve a pending request (reviewer)")
    p.add_argument("request_id", type=int)
    p.add_argument("--reviewer", required=True)
    p.add_argument("--days", type=int, help="grant lifetime (default: access.grant_days)")
    p.add_argument("--quota", type=int, help="downloads allowed (default: access.download_quota)")
    p = add("deny", cmd_deny, "deny a pending request (reviewer)")
    p.add_argument("request_id", type=int)
    p.add_argument("--reviewer", required=True)
    p.add_argument("--reason", required=True)
    p = add("revoke", cmd_revoke, "revoke a grant; its links stop working at once")
    p.add_argument("grant_id", type=int)
    p.add_argument("--actor", required=True)
    p.add_argument("--reason", required=True)
    p = add("link", cmd_link, "issue an expiring download link for your grant")
    p.add_argument("grant_id", type=int)
    p.add_argument("--user", required=True)
    p = add("download", cmd_download, "download a gated version with a link; files are sha256-verified")
    p.add_argument("token", help="the token or the opt-download: link")
    p.add_argument("--model", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--out", required=True)
    p = add("audit", cmd_audit, "show the append-only audit log")
    p.add_argument("--subject", help="e.g. grant:3 or request:2")
    add("demo", cmd_demo, "walk through request -> review -> link -> verified download -> revocation")
