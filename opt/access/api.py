"""The access service over HTTP (FastAPI): thin routes that parse, call `AccessService`, and map its errors.

The caller is a typed dependency (`Caller`), resolved by the app's `Authenticator`; no route reads credentials
or decides policy. Errors are one line in `{"detail": ...}`: 401 no or bad credentials, 403 refused by policy,
404 nothing the caller may see, 409 wrong state, 413 body too large, 416 bad range, 422 bad input, 429 too many
failed sign-ins from one address.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from opt.access import schemas as S
from opt.access.auth import Authenticator, FailureLimiter, Principal, TokenAuthenticator
from opt.access.errors import AccessDenied, AccessError, Conflict, NotFound, Unauthenticated
from opt.access.release import parse_range, read_range
from opt.access.service import AccessService

MAX_BODY_BYTES = 64 * 1024
# ids are 32-bit in the database (PostgreSQL's integer): a larger one names nothing, and says so as a 422
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": S.Error} for code in (401, 403, 404, 409, 413, 422, 429)}


class _RateLimited(Exception):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    app = request.app
    client = _client(request)
    wait = app.state.limiter.retry_after(client)
    if wait is not None:
        raise _RateLimited(wait)
    principal = app.state.authenticator.authenticate(authorization)
    if principal is None:
        app.state.limiter.failed(client)
        reason = "no credentials" if not authorization else "token unknown, expired or revoked"
        app.state.service.auth_refused(client, reason)
        raise Unauthenticated(f"{reason}; send `Authorization: Bearer <token>` with a token from `optctl access user add` or /v1/tokens")
    return principal


Caller = Annotated[Principal, Depends(caller)]


class _BodyLimit:
    """ASGI middleware: refuse request bodies over MAX_BODY_BYTES, declared or streamed, before a route reads them.
    A body without a length (chunked) is read up to the limit first, then handed on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes; requests are small JSON objects"}, status_code=413)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
                return await self._refuse(scope, receive, send, too_large)
            return await self.app(scope, receive, send)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                return await self._refuse(scope, receive, send, too_large)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any, response: JSONResponse) -> None:
        request = Request(scope)
        _audit_input(request, f"request body over {MAX_BODY_BYTES} bytes")
        await response(scope, receive, send)


def _audit_input(request: Request, reason: str) -> None:
    """Record a refusal of the HTTP layer, naming the caller if its credentials are good."""
    app = request.app
    who = app.state.authenticator.authenticate(request.headers.get("authorization"))
    app.state.service.input_refused(who.name if who else "anonymous", f"{request.method} {request.url.path}", reason, _client(request))


def create_app(service: AccessService, authenticator: Authenticator | None = None, limiter: FailureLimiter | None = None) -> FastAPI:
    app = FastAPI(title="OPT access service", version="1", description=__doc__, responses=ERRORS)
    app.state.service = service
    app.state.authenticator = authenticator or TokenAuthenticator(service)
    app.state.limiter = limiter or FailureLimiter()
    app.add_middleware(_BodyLimit)
    _errors(app)
    svc = service

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    from opt.access.pages import router as portal

    app.include_router(portal())

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/portal/", status_code=303)

    @app.get("/v1/public-key", response_model=S.PublicKeyOut)
    def public_key() -> S.PublicKeyOut:
        return S.PublicKeyOut(public_key=svc.keys.public_key, key_id=svc.keys.key_id)

    @app.get("/v1/me", response_model=S.MeOut)
    def me(who: Caller) -> S.MeOut:
        return S.MeOut(id=who.user_id, name=who.name, role=who.role)

    @app.post("/v1/users", response_model=S.NewUserOut, status_code=201)
    def create_user(body: S.UserIn, who: Caller) -> S.NewUserOut:
        user, token = svc.create_user(who, body.name, body.email, body.role)
        return S.NewUserOut(user=S.UserOut.of(user), token=S.NewTokenOut(id=token.id, token=token.token, expires_at=token.expires_at))

    @app.get("/v1/users", response_model=list[S.UserOut])
    def users(who: Caller) -> list[S.UserOut]:
        return [S.UserOut.of(u) for u in svc.list_users(who)]

    @app.get("/v1/tokens", response_model=list[S.TokenOut])
    def tokens(who: Caller) -> list[S.TokenOut]:
        return [S.TokenOut.of(t) for t in svc.list_tokens(who)]

    @app.post("/v1/tokens", response_model=S.NewTokenOut, status_code=201)
    def new_token(body: S.TokenIn, who: Caller) -> S.NewTokenOut:
        t = svc.issue_token(who, body.label, body.days)
        return S.NewTokenOut(id=t.id, token=t.token, expires_at=t.expires_at)

    @app.delete("/v1/tokens/{token_id}", response_model=S.TokenOut)
    def revoke_token(token_id: Id, who: Caller) -> S.TokenOut:
        return S.TokenOut.of(svc.revoke_token(who, token_id))

    @app.post("/v1/releases", response_model=S.ReleaseOut, status_code=201)
    def publish(body: S.ReleaseIn, who: Caller) -> S.ReleaseOut:
        expected = {f.path: f.sha256 for f in body.files}
        release = svc.publish_as(who, body.model, body.version, body.source, list(expected), body.licence, expected,
                                 body.gate_passed, body.gate_reasons)  # fmt: skip
        return S.ReleaseOut.of(release)

    @app.post("/v1/releases/{model}/{version}/override", response_model=S.ReleaseOut)
    def override(model: str, version: str, body: S.ReasonIn, who: Caller) -> S.ReleaseOut:
        return S.ReleaseOut.of(svc.override_as(who, model, version, body.reason))

    @app.get("/v1/releases/{model}/{version}", response_model=S.ReleaseOut)
    def release(model: str, version: str, who: Caller) -> S.ReleaseOut:
        return S.ReleaseOut.of(svc.release(who, model, version))

    @app.post("/v1/requests", response_model=S.RequestOut, status_code=201)
    def new_request(body: S.RequestIn, who: Caller) -> S.RequestOut:
        req = svc.request_access(
            who, body.model, body.version, body.affiliation, body.organisation_kind, body.purpose, body.accept_licence_sha256
        )
        return S.RequestOut.of(req)

    @app.get("/v1/requests", response_model=list[S.RequestOut])
    def requests(who: Caller, status: S.RequestStatus | None = None) -> list[S.RequestOut]:
        return [S.RequestOut.of(r) for r in svc.list_requests(who, status)]

    @app.get("/v1/requests/{request_id}", response_model=S.RequestOut)
    def get_request(request_id: Id, who: Caller) -> S.RequestOut:
        return S.RequestOut.of(svc.get_request(who, request_id))

    @app.post(
        "/v1/requests/{request_id}/approve",
        response_model=S.GrantOut,
        responses={202: {"model": S.RequestOut, "description": "two-person approval: the first of two approvals, recorded"}},
    )
    def approve(request_id: Id, body: S.ApproveIn, who: Caller) -> Any:
        grant = svc.approve(who, request_id, body.days, body.quota)
        if grant is None:
            return JSONResponse(S.RequestOut.of(svc.get_request(who, request_id)).model_dump(mode="json"), status_code=202)
        return S.GrantOut.of(grant)

    @app.post("/v1/requests/{request_id}/deny", response_model=S.RequestOut)
    def deny(request_id: Id, body: S.ReasonIn, who: Caller) -> S.RequestOut:
        return S.RequestOut.of(svc.deny(who, request_id, body.reason))

    @app.get("/v1/grants", response_model=list[S.GrantOut])
    def grants(who: Caller) -> list[S.GrantOut]:
        return [S.GrantOut.of(g) for g in svc.list_grants(who)]

    @app.post("/v1/grants/{grant_id}/revoke", response_model=S.GrantOut)
    def revoke(grant_id: Id, body: S.ReasonIn, who: Caller) -> S.GrantOut:
        return S.GrantOut.of(svc.revoke(who, grant_id, body.reason))

    @app.post("/v1/downloads", response_model=S.DownloadOut, status_code=201)
    def start_download(body: S.DownloadIn, who: Caller) -> S.DownloadOut:
        dl, rel = svc.start_download(who, body.model, body.version)
        return S.DownloadOut.of(dl, rel)

    @app.get("/v1/downloads/{download_id}/files/{path:path}", status_code=303, response_class=RedirectResponse,
             responses={303: {"description": "to a presigned S3 URL or the service's own short-lived file link"}})  # fmt: skip
    def download_file(download_id: Id, path: str, request: Request, who: Caller) -> RedirectResponse:
        grant = svc.file_link(who, download_id, path)
        url = grant.url if grant.url is not None else str(request.url_for("file_link", token=grant.token))
        return RedirectResponse(url, status_code=303)

    file_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "a byte range"},
        416: {"model": S.Error},
    }

    @app.get("/v1/files/{token}", name="file_link", response_class=StreamingResponse, responses=file_responses)
    def file_link(token: str, range: Annotated[str | None, Header()] = None) -> Response:
        local, file = svc.open_file_link(token)
        span = parse_range(range, file.size)
        start, end = span if span else (0, file.size - 1)
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(0, end - start + 1)), "ETag": f'"{file.sha256}"',
                   "Cache-Control": "no-store"}  # fmt: skip
        if span:
            headers["Content-Range"] = f"bytes {start}-{end}/{file.size}"
        body = read_range(local, start, end) if file.size else iter(())
        return StreamingResponse(body, status_code=206 if span else 200, headers=headers, media_type="application/octet-stream")

    @app.post("/v1/downloads/{download_id}/complete", response_model=S.DownloadOut)
    def complete(download_id: Id, who: Caller) -> S.DownloadOut:
        dl = svc.complete_download(who, download_id)
        return S.DownloadOut.of(dl, dl.grant.request.release)

    @app.get("/v1/audit", response_model=list[S.AuditOut])
    def audit(who: Caller, actor: str | None = None, action: str | None = None, subject: str | None = None) -> list[S.AuditOut]:
        return [S.AuditOut.of(e) for e in svc.audit(who, actor, action, subject)]

    @app.get("/v1/audit/verify", response_model=S.ChainOut)
    def verify(who: Caller) -> S.ChainOut:
        r = svc.verify_audit(who)
        return S.ChainOut(ok=r.ok, entries=r.entries, problem=r.problem, entry=r.entry)

    return app


def _errors(app: FastAPI) -> None:
    def one_line(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": message.splitlines()[0] if message else ""}, status_code=status, headers=headers)

    @app.exception_handler(Unauthenticated)
    def _401(request: Request, e: Unauthenticated) -> JSONResponse:
        return one_line(401, str(e), {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_RateLimited)
    def _429(request: Request, e: _RateLimited) -> JSONResponse:
        wait = max(1, round(e.retry_after))
        return one_line(429, f"too many failed sign-ins from this address; try again in {wait} s", {"Retry-After": str(wait)})

    @app.exception_handler(AccessDenied)
    def _403(request: Request, e: AccessDenied) -> JSONResponse:
        return one_line(403, str(e))

    @app.exception_handler(AccessError)
    def _4xx(request: Request, e: AccessError) -> JSONResponse:
        status = 404 if isinstance(e, NotFound) else 409 if isinstance(e, Conflict) else 416 if str(e) == "range not satisfiable" else 422
        return one_line(status, str(e))

    @app.exception_handler(RequestValidationError)
    def _422(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        _audit_input(request, message)
        return one_line(422, message)
