"""The rules of gated access, whoever calls: releases, requests, reviews, grants, downloads, the audit trail.

Every method takes the caller as a `Principal` (never a name typed by the caller) and decides on its own:
only reviewers and admins review and revoke, nobody reviews their own request, researchers see and act on
their own requests, grants, downloads and audit entries only, and every number a caller asks for (grant days,
quota) is bounded by the server's `Limits`. A refusal changes nothing, is audited with the actor, the object and
the reason, and raises AccessDenied (policy), NotFound (no such object visible to the caller) or AccessError.

Downloads: `start_download` takes one unit of the grant's quota for a whole download of the release (or resumes
the caller's open one, for free); `file_link` then checks the grant again for every file, so a revocation stops
the next file at once; `complete_download` closes it once the client verified every file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from opt.access import audit, links
from opt.access.accounts import Accounts
from opt.access.audit import ChainReport
from opt.access.auth import Principal
from opt.access.db import MODEL_LEN, TEXT_LEN, AccessRequest, AuditEntry, Download, Grant, OrganisationKind, Release, RequestStatus
from opt.access.errors import AccessDenied, AccessError, Conflict, NotFound
from opt.access.names import clean_text
from opt.access.release import ReleaseFile, manifest_files, manifest_text

MIN_PURPOSE_CHARS = 20
MAX_PURPOSE_CHARS = 5000


@dataclass(frozen=True)
class FileGrant:
    """Where one file of a download may be fetched: a presigned S3 URL, or the service's own short-lived link."""

    url: str | None
    token: str | None
    file: ReleaseFile


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) if not isinstance(result, CursorResult) else result.rowcount)


def open_key(user_id: int, release_id: int) -> str:
    return hashlib.sha256(f"{user_id}:{release_id}".encode()).hexdigest()


class AccessService(Accounts):
    # --- releases ------------------------------------------------------------------------------------

    def publish_release(
        self, model: str, version: str, source: str | Path, paths: list[str], licence: str,
        expected: dict[str, str] | None = None, by: str = "operator", gate_passed: bool = True, gate_reasons: list[str] | None = None,
    ) -> Release:  # fmt: skip
        """Copy a gated version's files from `source` (a local folder or an s3:// prefix the service can read) into
        the release root and record their manifest, signed. `expected` (path -> sha256, from the registry's download
        manifest) must match what was copied. Publishing a published version again with the same files returns it
        as it is; other files are refused, and a published release's files are never overwritten."""
        try:
            model, version = clean_text(model, "model", MODEL_LEN), clean_text(version, "version", 64)
            licence = clean_text(licence, "licence", 100_000, multiline=True)
        except AccessError as e:
            self._refuse(by, "release.publish", "release", e)
        subject = f"release:{model}:{version}"[:64]
        licence_sha = hashlib.sha256(licence.encode("utf-8")).hexdigest()
        with self._sessions() as s:
            existing = s.scalars(select(Release).where(Release.model_name == model, Release.model_version == version)).one_or_none()
        if existing is not None:
            have = {f.path: f.sha256 for f in manifest_files(existing.manifest).values()}
            if sorted(have) == sorted(paths) and (expected is None or expected == have) and existing.licence_sha256 == licence_sha:
                return existing
            self._refuse(by, "release.publish", subject, Conflict(f"{model} version {version} is already published with other files; "
                                                                  "register a new version instead"))  # fmt: skip
        try:
            location, files = self.releases.publish(model, version, str(source), paths)
        except AccessError as e:
            self._refuse(by, "release.publish", subject, e)
        changed = [f.path for f in files if expected is not None and expected.get(f.path) != f.sha256]
        if changed or (expected is not None and sorted(expected) != sorted(paths)):
            self._refuse(by, "release.publish", subject, AccessError(
                f"{', '.join(changed) or 'the file list'} differs from the registry's download manifest: the staged files changed "
                "after registration; register again"))  # fmt: skip
        text = manifest_text(model, version, files, licence_sha)
        try:
            with self._sessions.begin() as s:
                release = Release(
                model_name=model, model_version=version, location=location, manifest=text, signature=self.keys.sign(text.encode("utf-8")),
                    key_id=self.keys.key_id, licence=licence, licence_sha256=licence_sha, published_at=self._now(),
                    gate="passed" if gate_passed else "failed", gate_reasons=json.dumps(gate_reasons or []),
                )  # fmt: skip
                s.add(release)
                s.flush()
                detail = {"model": model, "version": version, "files": len(files), "gate": release.gate}
                self._audit(s, by, "release.published", f"release:{release.id}", detail)
        except IntegrityError:  # published at the same moment by another call: that one stands
            self._refuse(by, "release.publish", subject, Conflict(f"{model} version {version} was published meanwhile"))
        return release

    def override_gate(self, model: str, version: str, reason: str, by: str = "operator") -> Release:
        """Let a release that failed its gates be requested after all: a maintainer promoted it with --override."""
        reason = self._text(by, "release.override", "release", reason, "reason", MAX_PURPOSE_CHARS, multiline=True)
        with self._sessions.begin() as s:
            rel = s.scalars(select(Release).where(Release.model_name == model, Release.model_version == version)).one_or_none()
            if rel is not None:
                before = rel.gate
                rel.gate = "overridden"
                self._audit(s, by, "release.gate_overridden", f"release:{rel.id}", {"reason": reason, "was": before})
        if rel is None:
            self._refuse(by, "release.override", f"release:{model}:{version}"[:64], NotFound(f"no gated release {model} version {version}"))
        return rel

    def override_as(self, actor: Principal, model: str, version: str, reason: str) -> Release:
        self._need_admin(actor, "release.override", f"release:{model}:{version}"[:64])
        return self.override_gate(model, version, reason, by=actor.name)

    def publish_as(self, actor: Principal, model: str, version: str, source: str, paths: list[str], licence: str,
                   expected: dict[str, str], gate_passed: bool = True, gate_reasons: list[str] | None = None) -> Release:  # fmt: skip
        """Publish over the API: admins only (the registering operator's account), from under the staging root only,
        so no caller can make the service read its own keys or any other file."""
        subject = f"release:{model}:{version}"[:64]
        self._need_admin(actor, "release.publish", subject)
        if not self.staging_root:
            self._refuse(
                actor, "release.publish", subject, AccessError("this service takes no publications over HTTP: set access.staging_uri")
            )
        if not _under(source, self.staging_root):
            self._refuse(actor, "release.publish", subject, AccessError(f"the source must lie under the staging root {self.staging_root}"))
        return self.publish_release(model, version, source, paths, licence, expected, actor.name, gate_passed, gate_reasons)

    def release(self, actor: Principal, model: str, version: str) -> Release:
        """A published release (its licence, manifest and signature); any signed-in account may read it."""
        with self._sessions() as s:
            rel = s.scalars(select(Release).where(Release.model_name == model, Release.model_version == version)).one_or_none()
        if rel is None:
            self._refuse(actor, "release.read", f"release:{model}:{version}"[:64], NotFound(f"no gated release {model} version {version}"))
        return rel

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

    def approve(self, actor: Principal, request_id: int, days: int | None = None, quota: int | None = None) -> Grant:
        """Approve a pending request: a grant for `days` and `quota` whole downloads, within the server's limits."""
        subject = f"request:{request_id}"
        self._need_reviewer(actor, "request.approve", subject)
        lim = self.limits
        days = self._bounded(actor, "request.approve", subject, "days", days, lim.grant_days, lim.max_grant_days)
        quota = self._bounded(actor, "request.approve", subject, "quota", quota, lim.download_quota, lim.max_download_quota)
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
        except _Refusal as r:
            self._refuse(actor, "request.approve", subject, r.error)
        return self._grant(grant_id)

    def deny(self, actor: Principal, request_id: int, reason: str) -> AccessRequest:
        """Deny a pending request with a reason the requester sees; they may apply again."""
        subject = f"request:{request_id}"
        self._need_reviewer(actor, "request.deny", subject)
        reason = self._text(actor, "request.deny", subject, reason, "reason", MAX_PURPOSE_CHARS, multiline=True)
        try:
            with self._sessions.begin() as s:
                self._pending(s, actor, request_id, RequestStatus.DENIED, reason)
                self._audit(s, actor.name, "request.denied", subject, {"reason": reason})
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
            done = _rowcount(
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
        if done != 1:
            exists = self._grant_or_none(grant_id) is not None
            self._refuse(
                actor,
                "grant.revoke",
                subject,
                Conflict(f"grant {grant_id} is already revoked") if exists else NotFound(f"no grant {grant_id}"),
            )
        return self._grant(grant_id)

    # --- downloads -----------------------------------------------------------------------------------

    def start_download(self, actor: Principal, model: str, version: str) -> tuple[Download, Release]:
        """Start (or resume) a whole download of a release under the caller's grant; starting takes one unit of quota."""
        rel = self.release(actor, model, version)
        subject = f"release:{rel.id}"
        now = self._now()
        with self._sessions.begin() as s:
            grant = s.scalars(
                select(Grant).join(Grant.request)
                .where(AccessRequest.user_id == actor.user_id, AccessRequest.release_id == rel.id)
                .order_by(Grant.id.desc())
            ).first()  # fmt: skip
            reason = "no grant" if grant is None else grant.refusal_reason(now)
            if reason is None and grant is not None:
                open_dl = s.scalars(
                    select(Download).where(Download.grant_id == grant.id, Download.completed_at.is_(None), Download.expires_at > now)
                ).first()
                if open_dl is not None:
                    self._audit(s, actor.name, "download.resumed", f"download:{open_dl.id}", {"grant": grant.id})
                    return open_dl, rel
                taken = _rowcount(
                    s.execute(
                        update(Grant)
                        .where(
                            Grant.id == grant.id,
                            Grant.downloads_used < Grant.download_quota,
                            Grant.revoked_at.is_(None),
                            Grant.expires_at > now,
                        )
                        .values(downloads_used=Grant.downloads_used + 1)
                    )
                )  # one statement: of many parallel starts at quota - 1, exactly one gets the last unit
                if taken == 1:
                    dl = Download(grant_id=grant.id, started_at=now, expires_at=now + timedelta(hours=self.limits.download_hours))
                    s.add(dl)
                    s.flush()
                    self._audit(
                        s, actor.name, "download.started", f"download:{dl.id}", {"grant": grant.id, "model": model, "version": version}
                    )
                    return dl, rel
                reason = "quota exhausted"
        if reason in ("no grant", "grant revoked", "grant expired"):
            pending = [r for r in self.list_requests(actor, RequestStatus.PENDING) if r.release_id == rel.id]
            if pending:
                reason = "request pending"
        hints = {
            "request pending": "a reviewer has not decided your request yet (`optctl access list` shows it)",
            "no grant": f"you hold no approved grant for {model} version {version}; file a request (optctl access request)",
            "quota exhausted": f"every download of grant {grant.id if grant else ''} is used; file a new request",
            "grant revoked": "the grant was revoked; contact the reviewers",
            "grant expired": "the grant expired; file a new request",
        }
        why = reason or "no grant"
        self._refuse(actor, "download.start", subject, AccessDenied(why, hints.get(why, "")))

    def file_link(self, actor: Principal, download_id: int, path: str) -> FileGrant:
        """Where the caller may fetch one file of their open download: the grant is checked again, now."""
        subject = f"download:{download_id}"
        now = self._now()
        with self._sessions() as s:
            dl = s.get(Download, download_id)
        if dl is None or dl.grant.request.user_id != actor.user_id:
            self._refuse(actor, "file.get", subject, NotFound(f"no download {download_id} of yours"))
        reason = dl.grant.refusal_reason(now)
        if reason is None and dl.completed_at is not None:
            reason = "download completed"
        if reason is None and now >= dl.expires_at:
            reason = "download expired"
        if reason is not None:
            self._refuse(actor, "file.get", subject, AccessDenied(reason, "start the download again (optctl access download)"))
        rel = dl.grant.request.release
        file = manifest_files(rel.manifest).get(path)
        if file is None:
            self._refuse(actor, "file.get", subject, NotFound(f"{path!r} is not a file of {rel.model_name} version {rel.model_version}"))
        expires = now + timedelta(seconds=self.limits.link_ttl_seconds)
        with self._sessions.begin() as s:
            s.execute(update(Download).where(Download.id == download_id).values(files_served=Download.files_served + 1))
            self._audit(s, actor.name, "file.linked", subject, {"path": path, "expires_at": expires.isoformat()})
        if self.releases.is_s3:
            return FileGrant(self.releases.presigned_url(rel.location, path, self.limits.link_ttl_seconds), None, file)
        return FileGrant(None, links.sign(download_id, path, expires, self.keys.secret), file)

    def open_file_link(self, token: str) -> tuple[Path, ReleaseFile]:
        """The local file behind one of the service's file links, if the link is valid and its grant still holds."""
        now = self._now()
        try:
            link = links.verify(token, self.keys.secret, now)
        except AccessDenied as e:
            self._refuse("anonymous", "file.serve", "link", e)
        with self._sessions() as s:
            dl = s.get(Download, link.download)
        subject = f"download:{link.download}"
        owner = dl.grant.request.user.name if dl else "anonymous"
        reason = "download not found" if dl is None else dl.grant.refusal_reason(now) or ("download completed" if dl.completed_at else None)
        if reason is not None or dl is None:
            self._refuse(owner, "file.serve", subject, AccessDenied(reason or "download not found", "start the download again"))
        rel = dl.grant.request.release
        file = manifest_files(rel.manifest)[link.path]
        local = self.releases.local_file(rel.location, link.path)
        size = local.stat().st_size if local.is_file() else None
        if size != file.size:  # replaced or removed since publication: the sha256 the client checks would fail too
            self._refuse(owner, "file.serve", subject, AccessError(
                f"{link.path} in the release store is not the file that was published ({size} bytes, signed {file.size}); "
                "the release was altered: the operators must publish it again"))  # fmt: skip
        with self._sessions.begin() as s:
            self._audit(s, owner, "file.served", subject, {"path": link.path, "nonce": link.nonce})
        return local, file

    def complete_download(self, actor: Principal, download_id: int) -> Download:
        """Close a download once every file verified; a new download after this takes quota again."""
        subject = f"download:{download_id}"
        with self._sessions.begin() as s:
            dl = s.get(Download, download_id)
            mine = dl is not None and dl.grant.request.user_id == actor.user_id
            if mine and dl is not None and dl.completed_at is None:
                s.execute(update(Download).where(Download.id == download_id).values(completed_at=self._now()))
                self._audit(s, actor.name, "download.completed", subject, {"grant": dl.grant_id})
        if not mine:
            self._refuse(actor, "download.complete", subject, NotFound(f"no download {download_id} of yours"))
        with self._sessions() as s:
            out = s.get(Download, download_id)
            assert out is not None
            return out

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
        if _rowcount(s.execute(update(AccessRequest).where(*pending).values(**values))) != 1:
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


def _under(source: str, root: str) -> bool:
    """True if `source` names `root` or a place below it (local paths resolved first, so '..' and links cannot escape)."""
    if root.startswith("s3://") or source.startswith("s3://"):
        return source.rstrip("/").startswith(root.rstrip("/") + "/") and ".." not in source.split("/")
    base, path = Path(root).resolve(), Path(source).resolve()
    return path == base or base in path.parents


def audit_detail(entry: AuditEntry) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(entry.detail)
    return out
