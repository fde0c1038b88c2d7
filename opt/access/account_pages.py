"""The account's own pages: API tokens (create, shown once; revoke) and the audit trail with filters (reviewers
see everything, researchers their own entries, as the API decides)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from opt.access import schemas as S
from opt.access.errors import AccessDenied, AccessError

AUDIT_ROWS = 500  # newest first; narrow with the filters for older ones


def _day(raw: str) -> datetime | None:
    try:
        return datetime.strptime(raw, "%Y-%m-%d").replace(tzinfo=UTC) if raw else None
    except ValueError:
        return None


def add_account_pages(r: APIRouter, page: Callable[..., Any], signed_in: Callable[..., Any], checked: Callable[..., Any],
                      to_signin: Callable[[], Any]) -> None:  # fmt: skip
    def tokens_page(request: Request, status: int = 200, new: Any = None, error: str | None = None) -> Response:
        s = signed_in(request)
        if s is None:
            return to_signin()  # type: ignore[no-any-return]
        who, csrf = s
        svc = request.app.state.service
        rows = [S.TokenOut.of(t) for t in svc.list_tokens(who)]
        return page(request, "tokens.html", status, who=who, csrf=csrf, tokens=rows, new=new, error=error,  # type: ignore[no-any-return]
                    now=svc._now(), max_days=svc.limits.token_days)  # fmt: skip

    @r.get("/tokens")
    def tokens(request: Request) -> Response:
        return tokens_page(request)

    @r.post("/tokens")
    def create_token(request: Request, label: Annotated[str, Form(max_length=400)] = "", days: Annotated[int | None, Form()] = None,
                     csrf: Annotated[str, Form(max_length=200)] = "") -> Response:  # fmt: skip
        s = checked(request, csrf)
        if not isinstance(s, tuple):
            return s  # type: ignore[no-any-return]
        try:
            new = request.app.state.service.issue_token(s[0], label, days)
        except (AccessError, AccessDenied) as e:
            return tokens_page(request, 422, error=str(e))
        resp = tokens_page(request, 201, new=new)
        resp.headers["Cache-Control"] = "no-store"  # the token is on this page once
        return resp

    @r.post("/tokens/{token_id}/revoke")
    def revoke_token(request: Request, token_id: int, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
        s = checked(request, csrf)
        if not isinstance(s, tuple):
            return s  # type: ignore[no-any-return]
        try:
            request.app.state.service.revoke_token(s[0], token_id)
        except (AccessError, AccessDenied) as e:
            return tokens_page(request, 404, error=str(e))
        return RedirectResponse("/portal/tokens", status_code=303)

    @r.get("/audit")
    def audit(request: Request, actor: str = "", action: str = "", subject: str = "", since: str = "", until: str = "") -> Response:
        s = signed_in(request)
        if s is None:
            return to_signin()  # type: ignore[no-any-return]
        who, csrf = s
        filters = {"actor": actor[:64], "action": action[:64], "subject": subject[:64], "since": since[:10], "until": until[:10]}
        try:
            entries = request.app.state.service.audit(who, filters["actor"] or None, filters["action"] or None, filters["subject"] or None)
        except AccessDenied as e:
            return page(request, "message.html", 403, who=who, csrf=csrf, title="Refused", message=str(e))  # type: ignore[no-any-return]
        start, end = _day(filters["since"]), _day(filters["until"])
        rows = [S.AuditOut.of(e) for e in reversed(entries)
                if (start is None or e.at >= start) and (end is None or e.at < end.replace(hour=23, minute=59, second=59))]  # fmt: skip
        return page(request, "audit.html", who=who, csrf=csrf, entries=rows[:AUDIT_ROWS], total=len(rows), filters=filters)  # type: ignore[no-any-return]
