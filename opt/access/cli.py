"""`optctl access ...`: the access service's command line.

`serve`, `user add`, `user token` and `keygen` run where the access database and keys are (an operator). Every
other command talks to the service over HTTP as the token's user: the server from `--server` or `$OPT_ACCESS_URL`,
the token from `$OPT_ACCESS_TOKEN` or `--token-file` (mode 0600), never from the command line, where every local
user could read it in `ps`. A refusal prints one line and exits 2; what users typed is shown escaped.
"""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opt.access.names import terminal_safe as safe
from opt.errors import OptError

DEFAULT_URL = "http://127.0.0.1:8600"
TOKEN_ENV = "OPT_ACCESS_TOKEN"
URL_ENV = "OPT_ACCESS_URL"
PUBLIC_KEY_ENV = "OPT_ACCESS_PUBLIC_KEY"


def read_token_file(path: str) -> str:
    p = Path(path)
    try:
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise OptError(f"{path} is readable by other users (mode {mode & 0o777:o}); run `chmod 600 {path}`")
        token = p.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise OptError(f"token file {path}: {e.strerror or e}") from None
    if not token:
        raise OptError(f"token file {path} is empty")
    return token


def write_token_file(path: str, token: str) -> None:
    """Write a token to a new file only its owner can read."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise OptError(f"cannot write token file {path}: {e.strerror or e} (it must not exist yet)") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def _client(args: argparse.Namespace) -> Any:
    from opt.access.client import AccessClient

    token = read_token_file(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV)
    if not token:
        raise OptError(f"no token: set ${TOKEN_ENV} or pass --token-file FILE (an operator makes one with `optctl access user add`)")
    return AccessClient(args.server or os.environ.get(URL_ENV) or DEFAULT_URL, token)


def _service(args: argparse.Namespace) -> Any:
    from opt.access.server import build_service
    from opt.config import load_config

    return build_service(load_config(args.config, args.overrides).resolved(Path.cwd()).access)


# --- operator commands (on the database's host) ------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from opt.access.server import serve
    from opt.config import load_config

    serve(load_config(args.config, args.overrides).resolved(Path.cwd()).access, args.host, args.port, args.trusted_proxy)


def cmd_user_add(args: argparse.Namespace) -> None:
    user, token = _service(args).add_user(args.name, args.email, args.role)
    if args.token_out:
        write_token_file(args.token_out, token.token)
        print(f"account {user.name} ({user.role}) created; its token (expires {token.expires_at:%Y-%m-%d}) is in {args.token_out}")
    else:
        print(f"account {user.name} ({user.role}) created; its token, shown once (expires {token.expires_at:%Y-%m-%d}):")
        print(token.token)


def cmd_user_token(args: argparse.Namespace) -> None:
    token = _service(args).operator_token(args.name)
    if args.token_out:
        write_token_file(args.token_out, token.token)
        print(f"new token for {safe(args.name)} in {args.token_out} (expires {token.expires_at:%Y-%m-%d})")
    else:
        print(token.token)


def cmd_user_password(args: argparse.Namespace) -> None:
    """The password comes from the terminal (asked twice) or from stdin, never from the command line (`ps` shows that)."""
    import getpass
    import sys

    if sys.stdin.isatty():
        password = getpass.getpass(f"portal password for {safe(args.name)}: ")
        if getpass.getpass("again: ") != password:
            raise OptError("the two passwords differ; nothing changed")
    else:
        password = sys.stdin.readline().rstrip("\n")
    _service(args).set_password(args.name, password)
    print(f"{safe(args.name)} can sign in to the portal at /portal/ now")


def cmd_mail(args: argparse.Namespace) -> None:
    service = _service(args)
    if args.mail_cmd == "send":
        result = service.send_outbox()
        print(f"sent {result['sent']}, failed {result['failed']} (kept and retried later)")
        return
    rows = service.outbox(unsent_only=not args.all)
    if not rows:
        print("the outbox is empty" if args.all else "nothing waits to be sent")
    for m in rows:
        state = (
            f"sent {m.sent_at:%Y-%m-%d %H:%M}"
            if m.sent_at
            else f"waiting, {m.attempts} tries" + (f": {m.last_error}" if m.last_error else "")
        )
        print(f"{m.id:>5}  {safe(m.to_addr):<32} {safe(m.subject)[:60]:<60}  {safe(state)}")


def cmd_keygen(args: argparse.Namespace) -> None:
    from opt.access.keys import SIGNING_KEY_ENV, new_signing_seed

    print(f"{SIGNING_KEY_ENV}={new_signing_seed()}")


# --- everyone (over HTTP) ----------------------------------------------------------------------------


def cmd_whoami(args: argparse.Namespace) -> None:
    me = _client(args).call("GET", "/v1/me")
    print(f"{me['name']} ({me['role']})")


def cmd_licence(args: argparse.Namespace) -> None:
    rel = _client(args).call("GET", f"/v1/releases/{args.model}/{args.version}")
    print(rel["licence"])
    print(f"licence sha256 {rel['licence_sha256']}; accept it with `optctl access request ... --accept-licence`")


def cmd_request(args: argparse.Namespace) -> None:
    c = _client(args)
    rel = c.call("GET", f"/v1/releases/{args.model}/{args.version}")
    if not args.accept_licence:
        raise OptError(f"read the licence (`optctl access licence {args.model} {args.version}`) and pass --accept-licence to accept it")
    body = {"model": args.model, "version": args.version, "affiliation": args.affiliation, "organisation_kind": args.organisation_kind,
            "purpose": args.purpose, "accept_licence_sha256": rel["licence_sha256"]}  # fmt: skip
    req = c.call("POST", "/v1/requests", body)
    print(
        f"request {req['id']} filed for {safe(req['model'])} v{safe(req['version'])}; a reviewer decides it "
        "(`optctl access list` shows its state)"
    )


def cmd_list(args: argparse.Namespace) -> None:
    rows = _client(args).call("GET", "/v1/requests", params={"status": args.status})
    print(f"{'id':>4} {'status':<9} {'requester':<20} {'model':<20} {'version':>7}  {'kind':<22} affiliation")
    for r in rows:
        print(f"{r['id']:>4} {r['status']:<9} {safe(r['requester']):<20} {safe(r['model']):<20} {safe(r['version']):>7}  "
              f"{r['organisation_kind']:<22} {safe(r['affiliation'])}")  # fmt: skip
        if r["decision_reason"]:
            print(f"{'':>15}reason: {safe(r['decision_reason'])}")


def cmd_grants(args: argparse.Namespace) -> None:
    rows = _client(args).call("GET", "/v1/grants")
    print(f"{'id':>4} {'requester':<20} {'model':<20} {'version':>7}  {'expires (UTC)':<16} {'downloads':>9}  state")
    for g in rows:
        state = f"revoked: {safe(g['revoke_reason'])}" if g["revoked_at"] else "in force"
        print(f"{g['id']:>4} {safe(g['requester']):<20} {safe(g['model']):<20} {safe(g['version']):>7}  {g['expires_at'][:16]:<16} "
              f"{g['downloads_used']:>4}/{g['download_quota']:<4}  {state}")  # fmt: skip


def cmd_approve(args: argparse.Namespace) -> None:
    g = _client(args).call("POST", f"/v1/requests/{args.request_id}/approve", {"days": args.days, "quota": args.quota})
    if "download_quota" not in g:  # 202: the first of two approvals
        print(f"request {g['id']}: first of two approvals recorded; another reviewer must approve it too")
        return
    print(f"grant {g['id']} for {safe(g['requester'])}: {g['download_quota']} downloads until {g['expires_at'][:16]} UTC")


def cmd_deny(args: argparse.Namespace) -> None:
    r = _client(args).call("POST", f"/v1/requests/{args.request_id}/deny", {"reason": args.reason})
    print(f"request {r['id']} denied; {safe(r['requester'])} sees the reason and may apply again")


def cmd_revoke(args: argparse.Namespace) -> None:
    g = _client(args).call("POST", f"/v1/grants/{args.grant_id}/revoke", {"reason": args.reason})
    print(f"grant {g['id']} revoked: the next file of any download under it is refused")


def cmd_download(args: argparse.Namespace) -> None:
    from opt.cli_tools import writable_folder

    writable_folder(args.out, "--out")  # before asking the service for anything
    c = _client(args)
    files = c.download(args.model, args.version, Path(args.out), public_key=args.public_key or os.environ.get(PUBLIC_KEY_ENV),
                       workers=args.workers, progress=not args.no_progress)  # fmt: skip
    fresh = [f for f in files if not f.skipped]
    print(f"{len(files)} files, {sum(f.size for f in files):,} bytes, signature and sha256 verified, in {args.out}"
          + (f" ({len(files) - len(fresh)} already there)" if len(fresh) < len(files) else ""))  # fmt: skip


def cmd_audit(args: argparse.Namespace) -> None:
    c = _client(args)
    if args.what == "verify":
        r = c.call("GET", "/v1/audit/verify")
        if not r["ok"]:
            raise OptError(f"audit chain broken after {r['entries']} entries: {r['problem']}")
        print(f"audit chain intact: {r['entries']} entries, every hash and mac verified")
        return
    for e in c.call("GET", "/v1/audit", params={"actor": args.actor, "action": args.action, "subject": args.subject}):
        print(f"{e['id']:>6} {e['at'][:19]} {safe(e['actor']):<20} {e['action']:<22} {safe(e['subject']):<16} {safe(e['detail'])}")


def cmd_token(args: argparse.Namespace) -> None:
    c = _client(args)
    if args.token_cmd == "list":
        for t in c.call("GET", "/v1/tokens"):
            state = "revoked" if t["revoked_at"] else f"expires {t['expires_at'][:10]}"
            print(f"{t['id']:>4} {safe(t['label']):<30} {state}")
    elif args.token_cmd == "create":
        t = c.call("POST", "/v1/tokens", {"label": args.label, "days": args.days})
        write_token_file(args.token_out, t["token"])
        print(f"token {t['id']} in {args.token_out} (expires {t['expires_at'][:10]})")
    else:
        c.call("DELETE", f"/v1/tokens/{args.token_id}")
        print(f"token {args.token_id} revoked")


def cmd_demo(args: argparse.Namespace) -> None:
    from opt.access.demo import run_demo
    from opt.config import load_config

    run_demo(load_config(args.config, args.overrides).resolved(Path.cwd()))


def cmd_access_housekeeping(args: argparse.Namespace) -> None:
    from opt.access.housekeeping import run_housekeeping
    from opt.config import load_config

    remind = load_config(args.config, args.overrides).schedule.remind_after_hours
    service = _service(args)
    try:
        report = run_housekeeping(service, remind)
    finally:
        service.close()
    print(report.markdown(), end="")
    if not report.chain_ok:
        raise OptError(f"the access audit chain is broken: {report.chain_problem}")


def add_access_commands(sub: Any, config_args: Callable[..., None]) -> None:
    access = sub.add_parser("access", help="the access service for gated model versions").add_subparsers(dest="access_cmd", required=True)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", help=f"the access service's URL (default ${URL_ENV} or {DEFAULT_URL})")
        p.add_argument("--token-file", help=f"file holding your API token, mode 0600 (default ${TOKEN_ENV})")

    def add(name: str, func: Callable[[argparse.Namespace], None], help: str, operator: bool = False, parent: Any = access) -> Any:
        p = parent.add_parser(name, help=help)
        (config_args if operator else client_args)(p)
        p.set_defaults(func=func)
        return p

    p = add("serve", cmd_serve, "run the access service (HTTP; OpenAPI at /openapi.json)", operator=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--trusted-proxy", help="address of the TLS proxy in front, whose X-Forwarded-For is believed")
    users = access.add_parser("user", help="accounts (operator, on the database's host)").add_subparsers(dest="user_cmd", required=True)
    p = add("add", cmd_user_add, "create an account and print its first token once", operator=True, parent=users)
    p.add_argument("name")
    p.add_argument("--email", required=True)
    p.add_argument("--role", required=True, choices=["researcher", "reviewer", "admin"])
    p.add_argument("--token-out", help="write the token to this new file (mode 0600) instead of printing it")
    p = add("token", cmd_user_token, "a new token for an existing account (a lost token)", operator=True, parent=users)
    p.add_argument("name")
    p.add_argument("--token-out", help="write the token to this new file (mode 0600) instead of printing it")
    add(
        "housekeeping",
        cmd_access_housekeeping,
        "record expired grants, list requests waiting too long, verify the audit chain",
        operator=True,
    )
    p = add(
        "password",
        cmd_user_password,
        "set an account's portal password (asked on the terminal, or one line on stdin)",
        operator=True,
        parent=users,
    )
    p.add_argument("name")
    mail = access.add_parser("mail", help="the outbox of emails (operator)").add_subparsers(dest="mail_cmd", required=True)
    p = add("list", cmd_mail, "messages waiting to be sent (--all: every message)", operator=True, parent=mail)
    p.add_argument("--all", action="store_true")
    add("send", cmd_mail, "send what is due now (the running service does this every access.mail.send_every_s)", operator=True, parent=mail)
    add("keygen", cmd_keygen, "print a new release-signing key for the service's environment", operator=True)
    add("whoami", cmd_whoami, "the account your token belongs to")
    p = add("licence", cmd_licence, "show a gated release's licence")
    p.add_argument("model")
    p.add_argument("version")
    p = add("request", cmd_request, "request access to a gated model version")
    p.add_argument("--model", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--affiliation", required=True)
    p.add_argument("--organisation-kind", required=True, choices=["academic", "government", "civil-society", "industry-research-lab"])
    p.add_argument("--purpose", required=True, help="intended research use (at least 20 characters)")
    p.add_argument("--accept-licence", action="store_true", help="accept the release's licence (see `optctl access licence`)")
    p = add("list", cmd_list, "requests: your own, or every one for reviewers")
    p.add_argument("--status", choices=["pending", "approved", "denied", "revoked"])
    add("grants", cmd_grants, "grants: your own, or every one for reviewers")
    p = add("approve", cmd_approve, "approve a pending request (reviewers)")
    p.add_argument("request_id", type=int)
    p.add_argument("--days", type=int, help="grant lifetime (default and bound: the server's)")
    p.add_argument("--quota", type=int, help="whole downloads allowed (default and bound: the server's)")
    p = add("deny", cmd_deny, "deny a pending request with a reason (reviewers)")
    p.add_argument("request_id", type=int)
    p.add_argument("--reason", required=True)
    p = add("revoke", cmd_revoke, "revoke a grant; the next file is refused (reviewers)")
    p.add_argument("grant_id", type=int)
    p.add_argument("--reason", required=True)
    p = add("download", cmd_download, "download a gated version you hold a grant for; signature and sha256 verified")
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument("--out", required=True)
    p.add_argument("--public-key", help=f"the service's release key to pin (default ${PUBLIC_KEY_ENV}, else the one it serves)")
    p.add_argument("--workers", type=int, default=4, help="files fetched in parallel")
    p.add_argument("--no-progress", action="store_true")
    p = add("audit", cmd_audit, "the audit trail (yours; everyone's for reviewers), or `audit verify`")
    p.add_argument("what", nargs="?", choices=["verify"], help="verify: check the whole hash chain")
    p.add_argument("--actor")
    p.add_argument("--action")
    p.add_argument("--subject", help="e.g. grant:3 or request:2")
    tokens = access.add_parser("token", help="your API tokens").add_subparsers(dest="token_cmd", required=True)
    add("list", cmd_token, "list your tokens", parent=tokens)
    p = add("create", cmd_token, "make a new token into a file (mode 0600)", parent=tokens)
    p.add_argument("--label", required=True)
    p.add_argument("--days", type=int)
    p.add_argument("--token-out", required=True)
    p = add("revoke", cmd_token, "revoke one of your tokens", parent=tokens)
    p.add_argument("token_id", type=int)
    add("demo", cmd_demo, "request -> review -> verified download -> revocation, through a service on a free port", operator=True)
