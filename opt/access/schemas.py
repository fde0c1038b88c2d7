"""The HTTP API's bodies (pydantic): what a caller may send (nothing else: unknown fields are refused, so a client
cannot set its own role, owner or grant fields) and what the service answers, as `/openapi.json` documents."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from opt.access.db import AccessRequest, ApiToken, AuditEntry, Download, Grant, OrganisationKind, Release, RequestStatus, Role, User

SHORT = 200
LONG = 5000
# 32-bit, to keep JSON sane; the service then bounds it by its own limits, and says which
Count = Annotated[int, Field(ge=1, le=2**31 - 1)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserIn(Body):
    name: str = Field(max_length=SHORT)
    email: str = Field(max_length=320)
    role: Role


class TokenIn(Body):
    label: str = Field(max_length=SHORT)
    days: Count | None = None


class RequestIn(Body):
    model: str = Field(max_length=SHORT)
    version: str = Field(max_length=64)
    affiliation: str = Field(max_length=SHORT)
    organisation_kind: OrganisationKind
    purpose: str = Field(max_length=LONG)
    accept_licence_sha256: str = Field(max_length=64, description="sha256 of the release's licence text, which the requester read")


class StagedFile(Body):
    path: str = Field(max_length=1000)
    sha256: str = Field(pattern="^[0-9a-f]{64}$")


class ReleaseIn(Body):
    model: str = Field(max_length=SHORT)
    version: str = Field(max_length=64)
    source: str = Field(max_length=2000, description="a folder or s3:// prefix under the service's staging root")
    files: list[StagedFile] = Field(min_length=1, max_length=100_000)
    licence: str = Field(max_length=100_000)
    gate_passed: bool = True
    gate_reasons: list[str] = Field(default=[], max_length=1000)


class ApproveIn(Body):
    days: Count | None = None
    quota: Count | None = None


class ReasonIn(Body):
    reason: str = Field(max_length=LONG)


class DownloadIn(Body):
    model: str = Field(max_length=SHORT)
    version: str = Field(max_length=64)


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Error(Out):
    detail: str


class PublicKeyOut(Out):
    algorithm: str = "ed25519"
    public_key: str
    key_id: str


class MeOut(Out):
    id: int
    name: str
    role: Role


class UserOut(Out):
    id: int
    name: str
    email: str
    role: Role
    created_at: datetime

    @classmethod
    def of(cls, u: User) -> UserOut:
        return cls(id=u.id, name=u.name, email=u.email, role=Role(u.role), created_at=u.created_at)


class TokenOut(Out):
    id: int
    label: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, t: ApiToken) -> TokenOut:
        return cls(id=t.id, label=t.label, created_at=t.created_at, expires_at=t.expires_at, revoked_at=t.revoked_at)


class NewTokenOut(Out):
    id: int
    token: str = Field(description="shown once; only its hash is kept")
    expires_at: datetime


class NewUserOut(Out):
    user: UserOut
    token: NewTokenOut


class ReleaseOut(Out):
    model: str
    version: str
    licence: str
    licence_sha256: str
    manifest: str = Field(description="the exact text the service signed (canonical JSON)")
    signature: str
    key_id: str
    published_at: datetime
    gate: str = Field(description="passed, failed (cannot be requested) or overridden")
    gate_reasons: list[str]

    @classmethod
    def of(cls, r: Release) -> ReleaseOut:
        return cls(model=r.model_name, version=r.model_version, licence=r.licence, licence_sha256=r.licence_sha256, manifest=r.manifest,
                   signature=r.signature, key_id=r.key_id, published_at=r.published_at, gate=r.gate,
                   gate_reasons=json.loads(r.gate_reasons))  # fmt: skip


class RequestOut(Out):
    id: int
    requester: str
    model: str
    version: str
    status: RequestStatus
    created_at: datetime
    decided_at: datetime | None
    decision_reason: str | None
    first_approved_at: datetime | None = Field(None, description="two-person approval: when the first of two reviewers approved")
    # a requester's own details; shown to reviewers, and to the requester, never to another researcher
    email: str
    affiliation: str
    organisation_kind: OrganisationKind
    purpose: str

    @classmethod
    def of(cls, r: AccessRequest) -> RequestOut:
        return cls(id=r.id, requester=r.user.name, model=r.release.model_name, version=r.release.model_version,
                   status=RequestStatus(r.status), first_approved_at=r.first_approved_at,
                   created_at=r.created_at, decided_at=r.decided_at, decision_reason=r.decision_reason, email=r.user.email,
                   affiliation=r.affiliation, organisation_kind=OrganisationKind(r.organisation_kind), purpose=r.purpose)  # fmt: skip


class GrantOut(Out):
    id: int
    request_id: int
    requester: str
    model: str
    version: str
    created_at: datetime
    expires_at: datetime
    download_quota: int
    downloads_used: int
    revoked_at: datetime | None
    revoke_reason: str | None

    @classmethod
    def of(cls, g: Grant) -> GrantOut:
        r = g.request
        return cls(id=g.id, request_id=r.id, requester=r.user.name, model=r.release.model_name, version=r.release.model_version,
                   created_at=g.created_at, expires_at=g.expires_at, download_quota=g.download_quota, downloads_used=g.downloads_used,
                   revoked_at=g.revoked_at, revoke_reason=g.revoke_reason)  # fmt: skip


class DownloadOut(Out):
    id: int
    grant_id: int
    started_at: datetime
    expires_at: datetime
    completed_at: datetime | None
    release: ReleaseOut

    @classmethod
    def of(cls, d: Download, r: Release) -> DownloadOut:
        return cls(id=d.id, grant_id=d.grant_id, started_at=d.started_at, expires_at=d.expires_at, completed_at=d.completed_at,
                   release=ReleaseOut.of(r))  # fmt: skip


class AuditOut(Out):
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, e: AuditEntry) -> AuditOut:
        return cls(id=e.id, at=e.at, actor=e.actor, action=e.action, subject=e.subject, detail=json.loads(e.detail))


class ChainOut(Out):
    ok: bool
    entries: int
    problem: str | None
    entry: int | None
