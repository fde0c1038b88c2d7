"""The access workflow: request -> review -> grant -> expiring, version-scoped, audited downloads.

OPT-175B was released through a form, a manual review and an expiring signed URL; this is that process
with the gaps closed: a grant covers one registered model version, lasts `grant_days`, allows
`download_quota` downloads and can be revoked, and every link is checked against the grant at the moment
of use, so revocation stops links already handed out. Every state change, and every refused link or
download, writes an audit entry in the same transaction as the change.

A download is two calls. `authorize_download(token, name, version)` checks a link and returns the grant;
it can be called once per file (per-file links) and does not consume quota. `record_download(grant_id,
files, size_bytes)` is called once after the copy has been verified (sha256 against the download
manifest) and counts one download against the quota, so a copy that failed half-way costs nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import Session

from opt.access import links
from opt.access.db import (
    EMAIL_LEN,
    NAME_LEN,
    AccessRequest,
    AuditEntry,
    DownloadEvent,
    Grant,
    RequestStatus,
    make_engine,
    open_key_for,
    session_factory,
)
from opt.access.links import AccessDenied, AccessError, DownloadLink, load_secret

if TYPE_CHECKING:  # opt.config pulls in torch through the model presets; the access service must not need it
    from opt.config import AccessConfig

MIN_PURPOSE_CHARS = 20
MAX_PURPOSE_CHARS = 5000
# Plausibility only (one @, a dot in the domain, no spaces): the reviewer judges the rest.
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The default clock: now, timezone-aware UTC."""
    return datetime.now(UTC)


class AccessService:
    """Requests, reviews, grants, download links and the audit log, over one SQLAlchemy database."""

    def __init__(
        self,
        db_url: str,
        secret: bytes,
        link_ttl_seconds: int = 3600,
        grant_days: int = 30,
        download_quota: int = 5,
        clock: Clock = utc_now,
    ) -> None:
        links.check_secret(secret)
        self.link_ttl_seconds = _positive("link_ttl_seconds", link_ttl_seconds)
        self.grant_days = _positive("grant_days", grant_days)
        self.download_quota = _positive("download_quota", download_quota)
        self._secret = secret
        self._clock = clock
        try:
            self._engine = make_engine(db_url)
        except (ArgumentError, NoSuchModuleError) as e:
            raise AccessError(f"access.db_url is not a usable SQLAlchemy URL: {e}") from e
        self._sessions = session_factory(self._engine)

    @classmethod
    def from_config(cls, cfg: AccessConfig, home: Path, clock: Clock = utc_now) -> AccessService:
        """The service for a run configuration's `access` section; the secret comes from `$<secret_env>` or `home/access.secret`."""
        return cls(
            cfg.db_url,
            load_secret(cfg.secret_env, Path(home)),
            link_ttl_seconds=cfg.link_ttl_seconds,
            grant_days=cfg.grant_days,
            download_quota=cfg.download_quota,
            clock=clock,
        )

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    # --- requests and reviews ---------------------------------------------------------------------

    def request_access(
        self, requester: str, email: str, affiliation: str, purpose: str, model_name: str, model_version: str
    ) -> AccessRequest:
        """File a pending request for one model version; AccessError on bad input or if one is already open."""
        requester = _text("requester", requester)
        email = _text("email", email, EMAIL_LEN)
        if not EMAIL_RE.fullmatch(email):
            raise AccessError(f"email {email!r} does not look like an email address (name@institution.org)")
        affiliation = _text("affiliation", affiliation)
        purpose = _text("purpose", purpose, MAX_PURPOSE_CHARS)
        if len(purpose) < MIN_PURPOSE_CHARS:
            raise AccessError(
                f"purpose is {len(purpose)} characters: describe the intended research use in at least {MIN_PURPOSE_CHARS} "
                "(what you will study and why it needs this model)"
            )
        model_name = _text("model_name", model_name)
        model_version = _text("model_version", model_version, 64)
        now = self._now()
        key = open_key_for(requester, model_name, model_version)
        try:
            with self._sessions.begin() as s:
                superseded = self._release_spent_request(s, key, now)
                req = AccessRequest(
                    requester=requester,
                    email=email,
                    affiliation=affiliation,
                    purpose=purpose,
                    model_name=model_name,
                    model_version=model_version,
                    status=RequestStatus.PENDING,
                    created_at=now,
                    open_key=key,
                )
                s.add(req)
                s.flush()
                detail: dict[str, Any] = {"model": model_name, "version": model_version, "email": email, "affiliation": affiliation}
                if superseded is not None:
                    detail["supersedes_request"] = superseded
                _audit(s, now, requester, "request.created", f"request:{req.id}", detail)
        except IntegrityError as e:  # another request for the same key was committed between our check and insert
            raise AccessError(f"{requester} already has an open request for {model_name} version {model_version}") from e
        return req

    def approve(self, request_id: int, reviewer: str, days: int | None = None, quota: int | None = None) -> Grant:
        """Approve a pending request: a grant for `days` (default grant_days) and `quota` downloads (default download_quota)."""
        reviewer = _text("reviewer", reviewer)
        days = self.grant_days if days is None else _positive("days", days)
        quota = self.download_quota if quota is None else _positive("quota", quota)
        now = self._now()
        with self._sessions.begin() as s:
            req = self._review(s, request_id, reviewer, RequestStatus.APPROVED)
            expires_at = now + timedelta(days=days)
            grant = Grant(request=req, reviewer=reviewer, created_at=now, expires_at=expires_at, download_quota=quota, downloads_used=0)
            s.add(grant)
            s.flush()
            detail = {"grant": grant.id, "expires_at": grant.expires_at.isoformat(), "quota": quota}
            _audit(s, now, reviewer, "request.approved", f"request:{req.id}", detail)
        return grant

    def deny(self, request_id: int, reviewer: str, reason: str) -> AccessRequest:
        """Deny a pending request; the reason is kept in the audit log. The requester may file a new request."""
        reviewer = _text("reviewer", reviewer)
        reason = _text("reason", reason, MAX_PURPOSE_CHARS)
        now = self._now()
        with self._sessions.begin() as s:
            req = self._review(s, request_id, reviewer, RequestStatus.DENIED)
            _audit(s, now, reviewer, "request.denied", f"request:{req.id}", {"reason": reason})
        return req

    def revoke(self, grant_id: int, actor: str, reason: str) -> Grant:
        """Revoke a grant at once: links already issued for it are refused from now on."""
        actor = _text("actor", actor)
        reason = _text("reason", reason, MAX_PURPOSE_CHARS)
        now = self._now()
        with self._sessions.begin() as s:
            grant = _get_grant(s, grant_id)
            if grant.revoked_at is not None:
                raise AccessError(f"grant {grant_id} was already revoked by {grant.revoked_by} at {grant.revoked_at:%Y-%m-%d %H:%M} UTC")
            done = _rowcount(
                s.execute(update(Grant).where(Grant.id == grant_id, Grant.revoked_at.is_(None)).values(revoked_at=now, revoked_by=actor))
            )
            if done != 1:
                raise AccessError(f"grant {grant_id} was revoked concurrently; see `audit('grant:{grant_id}')`")
            s.execute(update(AccessRequest).where(AccessRequest.id == grant.request_id).values(status=RequestStatus.REVOKED, open_key=None))
            s.refresh(grant)
            _audit(s, now, actor, "grant.revoked", f"grant:{grant_id}", {"reason": reason, "request": grant.request_id})
        return grant

    # --- links and downloads ------------------------------------------------------------------------

    def issue_link(self, grant_id: int, requester: str) -> DownloadLink:
        """A signed link for the grant's own requester while the grant is active; it expires after link_ttl_seconds
        or with the grant, whichever is first. Refusals are audited and raise AccessDenied."""
        requester = _text("requester", requester)
        now = self._now()
        link: DownloadLink | None = None
        with self._sessions.begin() as s:
            grant = _get_grant(s, grant_id)
            reason = "not the grant's requester" if grant.request.requester != requester else grant.refusal_reason(now)
            if reason is None:
                expires_at = min(now + timedelta(seconds=self.link_ttl_seconds), grant.expires_at)
                payload = links.new_payload(grant.id, grant.request.model_name, grant.request.model_version, expires_at)
                token = links.sign(payload, self._secret)
                link = DownloadLink(grant_id=grant.id, token=token, url=links.LINK_SCHEME + token, expires_at=payload.expires_at)
                # the token is a bearer credential: the log keeps its nonce, never the token
                detail = {"nonce": payload.nonce, "expires_at": link.expires_at.isoformat()}
                _audit(s, now, requester, "link.issued", f"grant:{grant.id}", detail)
            else:
                _audit(s, now, requester, "link.refused", f"grant:{grant.id}", {"reason": reason})
        if link is None:
            raise AccessDenied(cast(str, reason), _hint(cast(str, reason), grant))
        return link

    def authorize_download(self, token: str, model_name: str, model_version: str) -> Grant:
        """Check a link (a token or an `opt-download:` URL) for a download of `model_name` version `model_version`.

        Returns the active grant, or raises AccessDenied with the reason: "signature invalid", "grant revoked",
        "grant expired", "quota exhausted", "link expired", "link is for a different model version".
        Either way a download event and an audit entry are recorded. Quota is not consumed here (see record_download).
        """
        now = self._now()
        grant: Grant | None = None
        with self._sessions.begin() as s:
            try:
                payload = links.verify_signature(token, self._secret)
            except AccessDenied as e:
                reason: str | None = e.reason
                claimed = links.peek(token)  # untrusted: recorded in the detail only, never as the event's grant
                detail: dict[str, Any] = {"reason": reason, "claimed_grant": claimed.grant if claimed else None}
                s.add(DownloadEvent(grant_id=None, at=now, ok=False, detail=reason))
                _audit(s, now, "unknown", "download.refused", "link", detail)
            else:
                grant = s.get(Grant, payload.grant)
                if grant is None:
                    reason = "grant not found"
                else:
                    reason = grant.refusal_reason(now)
                    if reason is None and payload.expired(now):
                        reason = links.LINK_EXPIRED
                    scope = (grant.request.model_name, grant.request.model_version)
                    if reason is None and ((model_name, model_version) != scope or (payload.model, payload.version) != scope):
                        reason = "link is for a different model version"
                detail = {"nonce": payload.nonce, "model": model_name, "version": model_version}
                if reason is not None:
                    detail["reason"] = reason
                s.add(DownloadEvent(grant_id=grant.id if grant else None, at=now, ok=reason is None, detail=reason or "authorized"))
                actor = grant.request.requester if grant else "unknown"
                action = "download.authorized" if reason is None else "download.refused"
                _audit(s, now, actor, action, f"grant:{payload.grant}", detail)
        if reason is not None:
            raise AccessDenied(reason, _hint(reason, grant, model_name, model_version))
        return cast(Grant, grant)

    def record_download(self, grant_id: int, files: int, size_bytes: int) -> Grant:
        """Count one completed, verified download against the grant's quota, with what was copied.

        Call it once per download after every file's sha256 matched the manifest. The increment is a single
        SQL update, so concurrent downloads are never lost from the count.
        """
        files = _non_negative("files", files)
        size_bytes = _non_negative("size_bytes", size_bytes)
        now = self._now()
        with self._sessions.begin() as s:
            grant = _get_grant(s, grant_id)
            s.execute(update(Grant).where(Grant.id == grant_id).values(downloads_used=Grant.downloads_used + 1))
            s.refresh(grant)
            s.add(DownloadEvent(grant_id=grant_id, at=now, ok=True, detail="completed", files=files, size_bytes=size_bytes))
            detail = {"files": files, "bytes": size_bytes, "downloads_used": grant.downloads_used, "quota": grant.download_quota}
            _audit(s, now, grant.request.requester, "download.completed", f"grant:{grant_id}", detail)
        return grant

    # --- reading ---------------------------------------------------------------------------------------

    def get_request(self, request_id: int) -> AccessRequest:
        """One request by id; AccessError if there is none."""
        with self._sessions() as s:
            return _get_request(s, request_id)

    def get_grant(self, grant_id: int) -> Grant:
        """One grant by id; AccessError if there is none."""
        with self._sessions() as s:
            return _get_grant(s, grant_id)

    def grant_for_request(self, request_id: int) -> Grant | None:
        """The grant made for a request, or None if it was never approved."""
        with self._sessions() as s:
            return s.scalars(select(Grant).where(Grant.request_id == request_id)).one_or_none()

    def list_requests(self, status: str | None = None) -> list[AccessRequest]:
        """Requests, oldest first, optionally only those with `status` (pending, approved, denied, revoked)."""
        query = select(AccessRequest).order_by(AccessRequest.id)
        if status is not None:
            if status not in set(RequestStatus):
                raise AccessError(f"unknown request status {status!r}; use one of {', '.join(RequestStatus)}")
            query = query.where(AccessRequest.status == status)
        with self._sessions() as s:
            return list(s.scalars(query))

    def download_events(self, grant_id: int | None = None) -> list[DownloadEvent]:
        """Download events, oldest first, optionally for one grant."""
        query = select(DownloadEvent).order_by(DownloadEvent.id)
        if grant_id is not None:
            query = query.where(DownloadEvent.grant_id == grant_id)
        with self._sessions() as s:
            return list(s.scalars(query))

    def audit(self, subject: str | None = None) -> list[AuditEntry]:
        """The audit log, oldest first, optionally for one subject (`request:<id>`, `grant:<id>`, `link`)."""
        query = select(AuditEntry).order_by(AuditEntry.id)
        if subject is not None:
            query = query.where(AuditEntry.subject == subject)
        with self._sessions() as s:
            return list(s.scalars(query))

    # --- internals ---------------------------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError(f"the access service clock returned a naive datetime {now!r}; it must be timezone-aware")
        return now.astimezone(UTC)

    def _review(self, s: Session, request_id: int, reviewer: str, decision: RequestStatus) -> AccessRequest:
        req = _get_request(s, request_id)
        if req.requester == reviewer:
            raise AccessDenied("reviewer is the requester", f"another reviewer must decide request {request_id}")
        if req.status != RequestStatus.PENDING:
            raise AccessError(f"request {request_id} is {req.status}; only pending requests can be approved or denied")
        # conditional update: of two reviewers deciding at once, exactly one wins
        open_key = req.open_key if decision == RequestStatus.APPROVED else None
        won = _rowcount(
            s.execute(
                update(AccessRequest)
                .where(AccessRequest.id == request_id, AccessRequest.status == RequestStatus.PENDING)
                .values(status=decision, open_key=open_key)
            )
        )
        if won != 1:
            raise AccessError(f"request {request_id} was reviewed concurrently by someone else; see `audit('request:{request_id}')`")
        s.refresh(req)
        return req

    def _release_spent_request(self, s: Session, key: str, now: datetime) -> int | None:
        """Raise if an open request blocks a new one; free the key of an approved request whose grant is used up or expired."""
        existing = s.scalars(select(AccessRequest).where(AccessRequest.open_key == key)).one_or_none()
        if existing is None:
            return None
        what = f"{existing.requester} already has request {existing.id} for {existing.model_name} version {existing.model_version}"
        if existing.status == RequestStatus.PENDING:
            raise AccessError(f"{what} pending review; a duplicate request is not accepted")
        grant = s.scalars(select(Grant).where(Grant.request_id == existing.id)).one_or_none()
        if grant is not None and grant.refusal_reason(now) is None:
            raise AccessError(
                f"{what} approved (grant {grant.id}, active until {grant.expires_at:%Y-%m-%d}); ask for a download link instead"
            )
        existing.open_key = None  # its grant expired or its quota is used up: a new request may be reviewed
        s.flush()
        return existing.id


def _audit(s: Session, at: datetime, actor: str, action: str, subject: str, detail: dict[str, Any]) -> None:
    s.add(AuditEntry(at=at, actor=actor, action=action, subject=subject, detail=json.dumps(detail, sort_keys=True, default=str)))


def _get_request(s: Session, request_id: int) -> AccessRequest:
    req = s.get(AccessRequest, request_id)
    if req is None:
        raise AccessError(f"no access request {request_id}")
    return req


def _get_grant(s: Session, grant_id: int) -> Grant:
    grant = s.get(Grant, grant_id)
    if grant is None:
        raise AccessError(f"no grant {grant_id}")
    return grant


def _rowcount(result: Any) -> int:
    return cast(CursorResult[Any], result).rowcount


def _hint(reason: str, grant: Grant | None, model_name: str = "", model_version: str = "") -> str:
    if reason == "link is for a different model version" and grant is not None:
        return f"it covers {grant.request.model_name} version {grant.request.model_version}, not {model_name} version {model_version}"
    if reason == "quota exhausted" and grant is not None:
        return f"all {grant.download_quota} downloads of grant {grant.id} are used; file a new access request"
    return {
        "grant revoked": "the grant was revoked; contact the reviewers",
        "grant expired": "file a new access request",
        "link expired": "ask for a new link",
        "grant not found": "the link names a grant this service does not know",
        "not the grant's requester": "links are issued only to the researcher the grant was made for",
    }.get(reason, "")


def _text(field: str, value: str, max_len: int = NAME_LEN) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AccessError(f"{field} is required")
    value = value.strip()
    if len(value) > max_len:
        raise AccessError(f"{field} is {len(value)} characters; at most {max_len} are allowed")
    return value


def _positive(field: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AccessError(f"{field} must be a whole number of at least 1, got {value!r}")
    return value


def _non_negative(field: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AccessError(f"{field} must be a whole number of at least 0, got {value!r}")
    return value
