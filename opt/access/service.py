"""The rules of gated access, whoever calls: requests, reviews, grants and the audit trail, over the releases
(`releases.py`), downloads (`downloads.py`) and accounts (`accounts.py`) they build on.

Every method takes the caller as a `Principal` (never a name typed by the caller) and decides on its own:
only reviewers and admins review and revoke, nobody reviews their own request, researchers see and act on
their own requests, grants, downloads and audit entries only, and every number a caller asks for (grant days,
quota) is bounded by the server's `Limits`. A refusal changes nothing, is audited with the actor, the object and
the reason, and raises AccessDenied (policy), NotFound (no such object visible to the caller) or AccessError.

`AccessService` is the whole service: every part's methods on one object, as the API and the CLI use it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from opt.access import audit
from opt.access.audit import ChainReport
from opt.access.auth import Principal
from opt.access.db import TEXT_LEN, AccessRequest, AuditEntry, Grant, OrganisationKind, RequestStatus, rowcount
from opt.access.downloads import Downloads
from opt.access.errors import AccessDenied, AccessError, Conflict, NotFound
from opt.access.names import clean_text

MIN_PURPOSE_CHARS = 20
MAX_PURPOSE_CHARS = 5000


def open_key(user_id: int, release_id: int) -> str:
    return hashlib.sha256(f"{user_id}:{release_id}".encode()).hexdigest()


class AccessService(Downloads):
    # --- requests and reviews ----------------------------------------------------------------------

    def request_access(
        self, actor: Principal, model: str, version: str, affiliation: str, organisation_kind: str, purpose: str, licence_sha256: str
    ) -> AccessRequest:
        """File a pending request for one release, accepting its licence (by the sha256 of the text shown)."""
        rel = self.release(actor, model, version)
        subject = f"release:{rel.id}"
        if rel.gate == "failed":
            failed = list(json.loads(rel.gate_reasons))[:3]
            hint = f"{'; '.join(failed)}; it cannot be released unless a maintainer promotes it with --override"
            self._refuse(actor, "request.create", subject, AccessDenied("version failed its gates", hint))
        try:
            affiliation = clean_text(affiliation, "affiliation", TEXT_LEN)
            purpose = clean_text(purpose, "purpose", MAX_PURPOSE_CHARS, MIN_PURPOSE_CHARS, multiline=True)
            if organisation_kind not in set(OrganisationKind):
                raise AccessError(f"organisation kind must be one of {', '.join(OrganisationKind)}")
            if licence_sha256 != rel.licence_sha256:
                raise AccessError("the licence accepted is not this release's licence; read it again and accept it (--accept-licence)")
        except AccessError as e:
            self._refuse(actor, "request.create", subject, e)
        now = self._now()
        key = open_key(actor.user_id, rel.id)
        try:
            with self._sessions.begin() as s:
                self._release_spent_request(s, key)
                req = AccessRequest(
                    user_id=actor.user_id, release_id=rel.id, affiliation=affiliation, organisation_kind=organisation_kind,
                    purpose=purpose, licence_sha256=licence_sha256, status=RequestStatus.PENDING, created_at=now, open_key=key,
                )  # fmt: skip
                s.add(req)
                s.flush()
                detail = {"model": model, "version": version, "organisation_kind": organisation_kind}
                self._audit(s, actor.name, "request.created", f"request:{req.id}", detail)
                self._mail_reviewers(s, f"[OPT access] request {req.id}: {actor.name} asks for {model} v{version}",
                                     f"{actor.name} ({affiliation}, {organisation_kind}) asks for {model} version {version}:\n\n"
                                     f"{purpose}\n\nReview it: {self.portal_link('/review')}\n", "request.created",
                                     except_user=actor.user_id)  # fmt: skip
        except _Refusal as r:
            self._refuse(actor, "request.create", subject, r.error)
        except IntegrityError:  # another request with the same key committed between our check and insert
            self._refuse(actor, "request.create", subject, Conflict(f"you already have an open request for {model} version {version}"))
        return self.get_request(actor, req.id)

    def list_requests(self, actor: Principal, status: str | None = None) -> list[AccessRequest]:
        """Requests oldest first: a researcher's own; every request for reviewers and admins."""
        query = select(AccessRequest).order_by(AccessRequest.id)
        if status is not None:
            if status not in set(RequestStatus):
                raise AccessError(f"unknown request status {status!r}; use one of {', '.join(RequestStatus)}")
            query = query.where(AccessRequest.status == status)
        if not actor.is_reviewer:
            query = query.where(AccessRequest.user_id == actor.user_id)
        with self._sessions() as s:
            return list(s.scalars(query))

    def get_request(self, actor: Principal, request_id: int) -> AccessRequest:
        with self._sessions() as s:
            req = s.get(AccessRequest, request_id)
        if req is None or not (actor.is_reviewer or req.user_id == actor.user_id):
            self._refuse(actor, "request.read", f"request:{request_id}", NotFound(f"no request {request_id} visible to you"))
        return req

    def approve(self, actor: Principal, request_id: int, days: int | None = None, quota: int | None = None) -> Grant | None:
        """Approve a pending request: a grant for `days` and `quota` whole downloads, within the server's limits.

        Under two-person approval (the release's model in `two_person_models`) the first reviewer's approval is
        recorded and returns None; the grant comes from a second, different reviewer's approval."""
        subject = f"request:{request_id}"
        self._need_reviewer(actor, "request.approve", subject)
        lim = self.limits
        days = self._bounded(actor, "request.approve", subject, "days", days, lim.grant_days, lim.max_grant_days)
        quota = self._bounded(actor, "request.approve", subject, "quota", quota, lim.download_quota, lim.max_download_quota)
        if self._first_of_two(actor, request_id, subject, days, quota):
            return None
        now = self._now()
        try:
            with self._sessions.begin() as s:
                req = self._pending(s, actor, request_id, RequestStatus.APPROVED)
                grant = Grant(request_id=req.id, reviewer_id=actor.user_id, created_at=now, expires_at=now + timedelta(days=days),
                              download_quota=quota, downloads_used=0)  # fmt: skip
                s.add(grant)
                s.flush()
                self._audit(s, actor.name, "request.approved", subject, {"grant": grant.id, "days": days, "quota": quota})
                grant_id = grant.id
                rel = req.release
                self._mail(s, req.user.email, f"[OPT access] request {req.id} approved: {rel.model_name} v{rel.model_version}",
                           f"Your request {req.id} for {rel.model_name} version {rel.model_version} is approved: {quota} downloads "
                           f"until {grant.expires_at:%Y-%m-%d %H:%M} UTC.\n\nDownload with:\n  optctl access download "
                           f"{rel.model_name} {rel.model_version} --out DIR\n\nYour grants: {self.portal_link('/')}\n",
                           "request.approved")  # fmt: skip
        except _Refusal as r:
            self._refuse(actor, "request.approve", subject, r.error)
        return self._grant(grant_id)

    two_person_models: frozenset[str] = frozenset()
    """Models whose requests need two reviewers' approvals (`access.two_person_models`)."""

    def _first_of_two(self, actor: Principal, request_id: int, subject: str, days: int, quota: int) -> bool:
        """True when this approval is the first of two (recorded); refuses the first reviewer approving twice."""
        if not self.two_person_models:
            return False
        with self._sessions.begin() as s:
            req = s.get(AccessRequest, request_id)
            if req is None or req.status != RequestStatus.PENDING or req.release.model_name not in self.two_person_models:
                return False  # the usual path refuses what is not pending
            if req.user_id == actor.user_id:
                return False  # the usual path refuses a reviewer's own request
            if req.first_approved_by == actor.user_id:
                refusal: AccessError | AccessDenied = AccessDenied("second approval by the same reviewer",
                                                                   "two-person approval: another reviewer must approve too")  # fmt: skip
            elif req.first_approved_by is None:
                done = rowcount(s.execute(update(AccessRequest).where(
                    AccessRequest.id == request_id, AccessRequest.first_approved_by.is_(None), AccessRequest.status == RequestStatus.PENDING
                ).values(first_approved_by=actor.user_id, first_approved_at=self._now())))  # fmt: skip
                if done != 1:
                    refusal = Conflict(f"request {request_id} was approved by another reviewer meanwhile; reload and approve again")
                else:
                    self._audit(s, actor.name, "request.approved_first", subject, {"days": days, "quota": quota})
                    rel = req.release
                    title = f"[OPT access] request {req.id} needs a second approval ({rel.model_name} v{rel.model_version})"
                    self._mail_reviewers(s, title,
                                         f"{actor.name} approved request {req.id} by {req.user.name}; {rel.model_name} needs two "
                                         f"reviewers. Review it: {self.portal_link('/review')}\n", "request.approved_first",
                                         except_user=actor.user_id)  # fmt: skip
                    return True
            else:
                return False  # the second approval, by another reviewer: the grant
        self._refuse(actor, "request.approve", subject, refusal)

    def deny(self, actor: Principal, request_id: int, reason: str) -> AccessRequest:
        """Deny a pending request with a reason the requester sees; they may apply again."""
        subject = f"request:{request_id}"
        self._need_reviewer(actor, "request.deny", subject)
        reason = self._text(actor, "request.deny", subject, reason, "reason", MAX_PURPOSE_CHARS, multiline=True)
        try:
            with self._sessions.begin() as s:
                req = self._pending(s, actor, request_id, RequestStatus.DENIED, reason)
                self._audit(s, actor.name, "request.denied", subject, {"reason": reason})
                rel = req.release
                self._mail(s, req.user.email, f"[OPT access] request {req.id} denied: {rel.model_name} v{rel.model_version}",
                           f"Your request {req.id} for {rel.model_name} version {rel.model_version} was denied:\n\n{reason}\n\n"
                           f"You may apply again: {self.portal_link('/')}\n", "request.denied")  # fmt: skip
        except _Refusal as r:
            self._refuse(actor, "request.deny", subject, r.error)
        return self.get_request(actor, request_id)

    # --- grants --------------------------------------------------------------------------------------

    def list_grants(self, actor: Principal) -> list[Grant]:
        query = select(Grant).join(Grant.request).order_by(Grant.id)
        if not actor.is_reviewer:
            query = query.where(AccessRequest.user_id == actor.user_id)
        with self._sessions() as s:
            return list(s.scalars(query))

    def revoke(self, actor: Principal, grant_id: int, reason: str) -> Grant:
        """Revoke a grant at once: the next file of any download under it is refused."""
        subject = f"grant:{grant_id}"
        self._need_reviewer(actor, "grant.revoke", subject)
        reason = self._text(actor, "grant.revoke", subject, reason, "reason", MAX_PURPOSE_CHARS, multiline=True)
        now = self._now()
        with self._sessions.begin() as s:
            done = rowcount(
                s.execute(
                    update(Grant)
                    .where(Grant.id == grant_id, Grant.revoked_at.is_(None))
                    .values(revoked_at=now, revoked_by=actor.user_id, revoke_reason=reason)
                )
            )
            if done == 1:
                grant = s.get(Grant, grant_id)
                assert grant is not None
                s.execute(
                    update(AccessRequest).where(AccessRequest.id == grant.request_id).values(status=RequestStatus.REVOKED, open_key=None)
                )
                self._audit(s, actor.name, "grant.revoked", subject, {"reason": reason, "request": grant.request_id})
                req, rel = grant.request, grant.request.release
                self._mail(s, req.user.email, f"[OPT access] grant {grant_id} revoked: {rel.model_name} v{rel.model_version}",
                           f"Your grant {grant_id} for {rel.model_name} version {rel.model_version} was revoked:\n\n{reason}\n",
                           "grant.revoked")  # fmt: skip
        if done != 1:
            exists = self._grant_or_none(grant_id) is not None
            self._refuse(
                actor,
                "grant.revoke",
                subject,
                Conflict(f"grant {grant_id} is already revoked") if exists else NotFound(f"no grant {grant_id}"),
            )
        return self._grant(grant_id)

    # --- the audit trail -------------------------------------------------------------------------------

    def audit(self, actor: Principal, who: str | None = None, action: str | None = None, subject: str | None = None) -> list[AuditEntry]:
        """Audit entries oldest first: a researcher's own actions; everything for reviewers and admins."""
        query = select(AuditEntry).order_by(AuditEntry.id)
        if not actor.is_reviewer:
            if who is not None and who != actor.name:
                self._refuse(
                    actor, "audit.read", f"user:{who}"[:64], AccessDenied("not a reviewer", "you can read your own audit entries only")
                )
            who = actor.name
        for column, value in ((AuditEntry.actor, who), (AuditEntry.action, action), (AuditEntry.subject, subject)):
            if value is not None:
                query = query.where(column == value)
        with self._sessions() as s:
            return list(s.scalars(query))

    def verify_audit(self, actor: Principal) -> ChainReport:
        self._need_reviewer(actor, "audit.verify", "audit")
        with self._sessions() as s:
            report = audit.verify(s, self.keys.secret)
        with self._sessions.begin() as s:
            self._audit(s, actor.name, "audit.verified", "audit", {"ok": report.ok, "entries": report.entries, "problem": report.problem})
        return report

    # --- internals -----------------------------------------------------------------------------------

    def _grant_or_none(self, grant_id: int) -> Grant | None:
        with self._sessions() as s:
            return s.get(Grant, grant_id)

    def _grant(self, grant_id: int) -> Grant:
        grant = self._grant_or_none(grant_id)
        assert grant is not None
        return grant

    def _pending(self, s: Session, actor: Principal, request_id: int, decision: RequestStatus, reason: str | None = None) -> AccessRequest:
        """Decide a pending request inside the caller's transaction; _Refusal (which rolls it back) if it cannot be."""
        req = s.get(AccessRequest, request_id)
        if req is None:
            raise _Refusal(NotFound(f"no request {request_id}"))
        if req.user_id == actor.user_id:
            raise _Refusal(AccessDenied("reviewer is the requester", "another reviewer must decide your own request"))
        # conditional update: of two reviewers deciding at once, exactly one wins
        values: dict[str, Any] = {"status": decision, "decided_at": self._now(), "decided_by": actor.user_id, "decision_reason": reason}
        if decision != RequestStatus.APPROVED:
            values["open_key"] = None
        pending = (AccessRequest.id == request_id, AccessRequest.status == RequestStatus.PENDING)
        if rowcount(s.execute(update(AccessRequest).where(*pending).values(**values))) != 1:
            raise _Refusal(Conflict(f"request {request_id} is {req.status}; only pending requests can be approved or denied"))
        s.refresh(req)
        return req

    def _release_spent_request(self, s: Session, key: str) -> None:
        """_Refusal while an open request blocks a new one; free the key of an approved one whose grant is spent."""
        existing = s.scalars(select(AccessRequest).where(AccessRequest.open_key == key)).one_or_none()
        if existing is None:
            return
        if existing.status == RequestStatus.PENDING:
            raise _Refusal(Conflict(f"your request {existing.id} for this release is still pending review"))
        grant = s.scalars(select(Grant).where(Grant.request_id == existing.id)).one_or_none()
        if grant is not None and grant.refusal_reason(self._now()) is None and grant.downloads_left > 0:
            raise _Refusal(Conflict(f"your grant {grant.id} for this release is in force until {grant.expires_at:%Y-%m-%d}"))
        existing.open_key = None
        s.flush()


class _Refusal(Exception):
    """Raised inside a transaction, so that it rolls back; the caller audits `error` after it, then raises it."""

    def __init__(self, error: AccessError | AccessDenied) -> None:
        super().__init__(str(error))
        self.error = error


def audit_detail(entry: AuditEntry) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(entry.detail)
    return out
