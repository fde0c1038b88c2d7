"""The portal: server-rendered pages (Jinja2, every value escaped) over the same `AccessService` as the API.

Plain HTML forms, no JavaScript. Signed-in browsers carry the session cookie (opt/access/web_sessions.py); every
POST must carry the session's CSRF token (the sign-in form a double-submit token of its own), or it is refused
with 403 and audited. Failed sign-ins count against the address in the service's failure limiter, as failed
tokens do: past the limit the sign-in page answers 429 until the window passes. A refusal by policy is shown on
the page as the service's one line; nothing in it is ever rendered unescaped.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from opt.access import schemas as S
from opt.access.auth import Principal
from opt.access.db import OrganisationKind
from opt.access.errors import AccessDenied, AccessError, Unauthenticated
from opt.access.web_sessions import csrf_ok

SESSION_COOKIE = "opt_session"
LOGIN_CSRF_COOKIE = "opt_signin_csrf"
TEMPLATES = Path(__file__).resolve().parent / "templates"
ORG_KINDS = {k.value: k.value.replace("-", " ").capitalize() for k in OrganisationKind}  # as in OPT-175B's form


def _templates() -> Any:
    from fastapi.templating import Jinja2Templates

    t = Jinja2Templates(directory=str(TEMPLATES))  # autoescape on for .html
    t.env.filters["when"] = lambda d: d.strftime("%Y-%m-%d %H:%M UTC") if isinstance(d, datetime) else "-"
    return t


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def router() -> APIRouter:
    r = APIRouter(prefix="/portal", include_in_schema=False)
    templates = _templates()

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"org_kinds": ORG_KINDS, **ctx}, status_code=status)  # type: ignore[no-any-return]

    def signed_in(request: Request) -> tuple[Principal, str] | None:
        return request.app.state.service.session(request.cookies.get(SESSION_COOKIE))  # type: ignore[no-any-return]

    def to_signin() -> RedirectResponse:
        return RedirectResponse("/portal/signin", status_code=303)

    def refused_csrf(request: Request, who: str) -> HTMLResponse:
        request.app.state.service.input_refused(who, request.url.path, "form without its CSRF token", _client(request))
        return page(request, "message.html", 403, who=None, title="Refused",
                    message="This form was not sent from the portal's own page (its CSRF token is missing or wrong). "
                            "Reload the page and send it again.")  # fmt: skip

    def checked(request: Request, csrf: str | None) -> tuple[Principal, str] | HTMLResponse | RedirectResponse:
        s = signed_in(request)
        if s is None:
            return to_signin()
        if not csrf_ok(s[1], csrf):
            return refused_csrf(request, s[0].name)
        return s

    @r.get("/signin", response_class=HTMLResponse)
    def signin_form(request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        resp = page(request, "signin.html", who=None, csrf=token, error=None)
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_secure(request), path="/portal")
        return resp

    @r.post("/signin", response_class=HTMLResponse)
    def signin(request: Request, name: Annotated[str, Form(max_length=200)] = "", password: Annotated[str, Form(max_length=1024)] = "",
               csrf: Annotated[str, Form(max_length=200)] = "") -> Response:  # fmt: skip
        svc, limiter, client = request.app.state.service, request.app.state.limiter, _client(request)
        if not csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE, ""), csrf):
            return refused_csrf(request, "anonymous")
        wait = limiter.retry_after(client)
        if wait is not None:
            resp: Response = page(
                request,
                "signin.html",
                429,
                who=None,
                csrf=csrf,
                error=f"Too many failed sign-ins from your address; try again in {wait:.0f} s.",
            )
            resp.headers["Retry-After"] = str(max(1, round(wait)))
            return resp
        try:
            token, _ = svc.sign_in(name, password, client)
        except Unauthenticated:
            limiter.failed(client)
            return page(request, "signin.html", 401, who=None, csrf=csrf, error="Wrong account name or password.")
        resp = RedirectResponse("/portal/", status_code=303)
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", secure=_secure(request), path="/",
                        max_age=svc.session_hours * 3600)  # fmt: skip
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/portal")
        return resp

    @r.post("/signout")
    def signout(request: Request, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
        s = checked(request, csrf)
        if not isinstance(s, tuple):
            return s
        request.app.state.service.sign_out(request.cookies.get(SESSION_COOKIE, ""))
        resp = to_signin()
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @r.get("/", response_class=HTMLResponse)
    def home(request: Request, done: str = "") -> Response:
        """My requests and grants: state, denial reasons, waiting time, expiry, downloads left, the download command."""
        s = signed_in(request)
        if s is None:
            return to_signin()
        who, csrf = s
        svc = request.app.state.service
        mine = [S.RequestOut.of(x) for x in svc.list_requests(who) if x.user.name == who.name]
        grants = [S.GrantOut.of(g) for g in svc.list_grants(who) if g.request.user.name == who.name]
        releases = [S.ReleaseOut.of(x) for x in svc.list_releases(who)]
        return page(request, "home.html", who=who, csrf=csrf, requests=mine, grants=grants, releases=releases, now=svc._now(),
                    server=str(request.base_url).rstrip("/"), done=done[:200])  # fmt: skip

    @r.get("/request", response_class=HTMLResponse)
    def request_form(request: Request, model: str = "", version: str = "") -> Response:
        s = signed_in(request)
        if s is None:
            return to_signin()
        who, csrf = s
        svc = request.app.state.service
        try:
            rel = S.ReleaseOut.of(svc.release(who, model[:200], version[:64]))
        except AccessError as e:
            return page(request, "message.html", 404, who=who, csrf=csrf, title="No such release", message=str(e))
        return page(request, "request.html", who=who, csrf=csrf, release=rel, email=svc.user_of(who).email, error=None, form={})

    @r.post("/request", response_class=HTMLResponse)
    def file_request(request: Request, model: Annotated[str, Form(max_length=200)], version: Annotated[str, Form(max_length=64)],
                     affiliation: Annotated[str, Form(max_length=400)] = "", organisation_kind: Annotated[str, Form(max_length=40)] = "",
                     purpose: Annotated[str, Form(max_length=6000)] = "", licence_sha256: Annotated[str, Form(max_length=64)] = "",
                     accept: Annotated[str, Form(max_length=10)] = "",
                     csrf: Annotated[str, Form(max_length=200)] = "") -> Response:  # fmt: skip
        s = checked(request, csrf)
        if not isinstance(s, tuple):
            return s
        who, csrf = s
        svc = request.app.state.service
        form = {"affiliation": affiliation, "organisation_kind": organisation_kind, "purpose": purpose}
        try:
            rel = S.ReleaseOut.of(svc.release(who, model, version))
            if accept != "yes":
                raise AccessError("accept the licence to request access (tick the box under its text)")
            req = svc.request_access(who, model, version, affiliation, organisation_kind, purpose, licence_sha256)
        except (AccessError, AccessDenied) as e:
            if "rel" not in locals():
                return page(request, "message.html", 404, who=who, csrf=csrf, title="No such release", message=str(e))
            return page(request, "request.html", 422 if isinstance(e, AccessError) else 403, who=who, csrf=csrf, release=rel,
                        email=svc.user_of(who).email, error=str(e), form=form)  # fmt: skip
        return RedirectResponse(f"/portal/?done=request+{req.id}+filed", status_code=303)

    from opt.access.review_pages import add_review_pages

    add_review_pages(r, page, signed_in, checked, to_signin)
    from opt.access.account_pages import add_account_pages

    add_account_pages(r, page, signed_in, checked, to_signin)
    return r
