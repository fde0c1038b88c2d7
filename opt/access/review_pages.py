"""The reviewer's pages: the queue of pending requests (oldest first, with each requester's history), approve with
days and quota within the server's bounds, deny with a reason, the grants with revoke. The service decides who may
(reviewers and admins, never on their own request); these pages only render and post."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from opt.access import schemas as S
from opt.access.db import RequestStatus
from opt.access.errors import AccessDenied, AccessError

Id = Annotated[int, "request or grant id"]


def add_review_pages(r: APIRouter, page: Callable[..., Any], signed_in: Callable[..., Any], checked: Callable[..., Any],
                     to_signin: Callable[[], Any]) -> None:  # fmt: skip
    def queue(request: Request, status: int = 200, error: str | None = None, done: str = "") -> Response:
        s = signed_in(request)
        if s is None:
            return to_signin()  # type: ignore[no-any-return]
        who, csrf = s
        svc = request.app.state.service
        if not who.is_reviewer:
            return page(request, "message.html", 403, who=who, csrf=csrf, title="Reviewers only",  # type: ignore[no-any-return]
                        message="The queue is for reviewers; your own requests are on your page.")  # fmt: skip
        everything = [S.RequestOut.of(x) for x in svc.list_requests(who)]
        pending = sorted((x for x in everything if x.status == RequestStatus.PENDING), key=lambda x: (x.created_at, x.id))
        history = {x.requester: [y for y in everything if y.requester == x.requester and y.id != x.id] for x in pending}
        grants = [S.GrantOut.of(g) for g in svc.list_grants(who)]
        their_grants = {x.requester: [g for g in grants if g.requester == x.requester] for x in pending}
        return page(request, "review.html", status, who=who, csrf=csrf, pending=pending, history=history, grants=grants,  # type: ignore[no-any-return]
                    their_grants=their_grants,
                    limits=svc.limits, now=svc._now(), error=error, done=done[:200], two_person=svc.two_person_models)  # fmt: skip

    @r.get("/review")
    def review(request: Request, done: str = "") -> Response:
        return queue(request, done=done)

    def act(request: Request, csrf: str, call: Callable[[Any, Any], Any], done: str) -> Response:
        s = checked(request, csrf)
        if not isinstance(s, tuple):
            return s  # type: ignore[no-any-return]
        try:
            call(request.app.state.service, s[0])
        except (AccessError, AccessDenied) as e:
            return queue(request, 403 if isinstance(e, AccessDenied) else 422, error=str(e))
        return RedirectResponse(f"/portal/review?done={done}", status_code=303)

    @r.post("/review/{request_id}/approve")
    def approve(request: Request, request_id: int, days: Annotated[int | None, Form()] = None, quota: Annotated[int | None, Form()] = None,
                csrf: Annotated[str, Form(max_length=200)] = "") -> Response:  # fmt: skip
        done = {"v": f"request+{request_id}+approved"}

        def call(svc: Any, who: Any) -> None:
            if svc.approve(who, request_id, days, quota) is None:
                done["v"] = f"request+{request_id}:+first+of+two+approvals+recorded"

        resp = act(request, csrf, call, "")
        if isinstance(resp, RedirectResponse):
            return RedirectResponse(f"/portal/review?done={done['v']}", status_code=303)
        return resp

    @r.post("/review/{request_id}/deny")
    def deny(request: Request, request_id: int, reason: Annotated[str, Form(max_length=2000)] = "",
             csrf: Annotated[str, Form(max_length=200)] = "") -> Response:  # fmt: skip
        return act(request, csrf, lambda svc, who: svc.deny(who, request_id, reason), f"request+{request_id}+denied")

    @r.post("/grants/{grant_id}/revoke")
    def revoke(request: Request, grant_id: int, reason: Annotated[str, Form(max_length=2000)] = "",
               csrf: Annotated[str, Form(max_length=200)] = "") -> Response:  # fmt: skip
        return act(request, csrf, lambda svc, who: svc.revoke(who, grant_id, reason), f"grant+{grant_id}+revoked")
