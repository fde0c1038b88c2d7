"""`optctl access demo` (the end of `make run`): the gated workflow through a running access service.

It starts the service on a free loopback port, makes (or reuses) a demo researcher and reviewer, and walks through
request -> refusals -> review -> a signed, verified download -> a forged link refused -> revocation -> the audit
chain verified, every step over HTTP as that person would, then stops the service.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from opt.access.client import AccessClient, ServiceRefused
from opt.access.errors import Conflict
from opt.errors import OptError

RESEARCHER, REVIEWER = "demo-researcher", "demo-reviewer"


def _account(service: Any, name: str, email: str, role: str) -> str:
    try:
        return str(service.add_user(name, email, role)[1].token)
    except Conflict:  # a demo run before this one made it
        return str(service.operator_token(name, "access demo").token)


def _refused(call: Any) -> str:
    try:
        call()
    except ServiceRefused as e:
        return e.detail
    raise OptError("access demo: a call that must be refused was accepted; the access gate is broken")


def run_demo(cfg: Any) -> None:
    from opt.access.server import build_service
    from opt.registry.mlflow_registry import newest_version

    name = cfg.model_name
    version = newest_version(cfg.tracking.uri, name)
    service = build_service(cfg.access)
    try:
        _walk_through(service, name, version)
    finally:
        service.close()


def _walk_through(service: Any, name: str, version: str) -> None:
    from opt.access.server import running

    researcher_token = _account(service, RESEARCHER, "researcher@university.edu", "researcher")
    reviewer_token = _account(service, REVIEWER, "reviewer@lab.org", "reviewer")
    with running(service) as srv:
        print(f"\nAccess workflow on gated {name} v{version}, through the access service at {srv.url}:")
        researcher, reviewer = AccessClient(srv.url, researcher_token), AccessClient(srv.url, reviewer_token)
        try:
            rel = researcher.call("GET", f"/v1/releases/{name}/{version}")
            if rel["gate"] == "failed":  # the service will refuse it: show that, and stop
                print(f"  {name} v{version} failed its gates: {rel['gate_reasons'][0] if rel['gate_reasons'] else 'see its card'}")
                body = {"model": name, "version": version, "affiliation": "Demo University", "organisation_kind": "academic",
                        "purpose": "Reproduce the OPT evaluation on held-out Python documentation",
                        "accept_licence_sha256": rel["licence_sha256"]}  # fmt: skip
                print(f"  a request for it is refused: {_refused(lambda: researcher.call('POST', '/v1/requests', body))}")
                return
            body = {"model": name, "version": version, "affiliation": "Demo University", "organisation_kind": "academic",
                    "purpose": "Reproduce the OPT evaluation on held-out Python documentation",
                    "accept_licence_sha256": rel["licence_sha256"]}  # fmt: skip
            try:
                req = researcher.call("POST", "/v1/requests", body)
            except ServiceRefused as e:  # an earlier demo's request is still open: close it the reviewer's way
                if e.status != 409:
                    raise
                mine = researcher.call("GET", "/v1/requests")
                old = next(r for r in mine if r["status"] in ("pending", "approved") and r["version"] == version)
                if old["status"] == "pending":
                    reviewer.call("POST", f"/v1/requests/{old['id']}/deny", {"reason": "superseded by a new demo run"})
                else:
                    grant = next(g for g in reviewer.call("GET", "/v1/grants") if g["request_id"] == old["id"])
                    reviewer.call("POST", f"/v1/grants/{grant['id']}/revoke", {"reason": "superseded by a new demo run"})
                req = researcher.call("POST", "/v1/requests", body)
            print(f"  1. {RESEARCHER} reads the licence and files request {req['id']} (pending)")
            why = _refused(lambda: researcher.download(name, version, Path(tempfile.mkdtemp()), progress=False))
            print(f"  2. before the review the download is refused: {why}")
            why = _refused(lambda: researcher.call("POST", f"/v1/requests/{req['id']}/approve", {}))
            print(f"  3. the researcher cannot approve their own request: {why}")
            grant = reviewer.call("POST", f"/v1/requests/{req['id']}/approve", {"quota": 2, "days": 7})
            print(f"  4. {REVIEWER} approves: grant {grant['id']}, {grant['download_quota']} downloads until {grant['expires_at'][:10]}")
            with tempfile.TemporaryDirectory() as tmp:
                files = researcher.download(name, version, Path(tmp), progress=False)
                size = sum(f.size for f in files)
                print(f"  5. download: {len(files)} files, {size:,} bytes, manifest signature and every sha256 verified")
            why = _refused(lambda: researcher.call("GET", "/v1/files/forged.link"))
            print(f"  6. a forged file link is refused: {why}")
            reviewer.call("POST", f"/v1/grants/{grant['id']}/revoke", {"reason": "demo finished"})
            why = _refused(lambda: researcher.download(name, version, Path(tempfile.mkdtemp()), progress=False))
            print(f"  7. after revocation the next download is refused at once: {why}")
            chain = reviewer.call("GET", "/v1/audit/verify")
            print(f"  8. the audit chain verifies: {chain['entries']} entries (`optctl access audit verify`)")
        finally:
            researcher.close()
            reviewer.close()
