"""The access database: requests, grants, download events and an append-only audit log (SQLAlchemy 2 ORM).

Portable SQL only, so the same models run on the embedded SQLite file and on PostgreSQL: no partial
indexes, no triggers. Two invariants are kept by plain unique constraints instead:
- one grant per request (`grants.request_id` is unique);
- one open (pending or approved) request per requester and model version: `access_requests.open_key` holds
  a hash of the three while the request is open and NULL once it is closed; NULLs never collide.

Datetimes are timezone-aware UTC in Python whatever the backend stores (`UTCDateTime`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Dialect, ForeignKey, String, Text, TypeDecorator, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, ORMExecuteState, Session, mapped_column, relationship, sessionmaker

NAME_LEN = 200  # requester, reviewer, affiliation, model name: VARCHAR limits PostgreSQL enforces
EMAIL_LEN = 320  # RFC 5321: 64 local + @ + 255 domain


class RequestStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    REVOKED = "revoked"


OPEN_STATUSES = (RequestStatus.PENDING, RequestStatus.APPROVED)


class AppendOnlyViolation(RuntimeError):
    """Code tried to update or delete an audit entry; the audit log only grows."""


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out. SQLite (and MySQL) store naive values: we store UTC and re-attach it."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the access database stores timezone-aware UTC datetimes only")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class AccessRequest(Base):
    """A researcher's request for one registered model version (name + version)."""

    __tablename__ = "access_requests"
    __table_args__ = (CheckConstraint("status IN ('pending', 'approved', 'denied', 'revoked')", name="ck_access_requests_status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    requester: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    email: Mapped[str] = mapped_column(String(EMAIL_LEN))
    affiliation: Mapped[str] = mapped_column(String(NAME_LEN))
    purpose: Mapped[str] = mapped_column(Text)
    model_name: Mapped[str] = mapped_column(String(NAME_LEN))
    model_version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.PENDING)
    created_at: Mapped[datetime]
    open_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    """`open_key_for(...)` while pending or approved, NULL once denied, revoked or superseded."""

    def __repr__(self) -> str:
        return (
            f"AccessRequest(id={self.id}, requester={self.requester!r}, model={self.model_name}:{self.model_version}, status={self.status})"
        )


class Grant(Base):
    """An approved request: access to one model version until `expires_at`, for `download_quota` downloads."""

    __tablename__ = "grants"

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("access_requests.id"), unique=True)
    reviewer: Mapped[str] = mapped_column(String(NAME_LEN))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    download_quota: Mapped[int]
    downloads_used: Mapped[int] = mapped_column(default=0)
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(String(NAME_LEN))

    # joined: a Grant returned by the service is detached, and callers read grant.request.requester / model_version
    request: Mapped[AccessRequest] = relationship(lazy="joined")

    @property
    def downloads_left(self) -> int:
        return max(0, self.download_quota - self.downloads_used)

    def refusal_reason(self, now: datetime) -> str | None:
        """Why the grant cannot be used at `now` ("grant revoked", "grant expired", "quota exhausted"), or None if active."""
        if self.revoked_at is not None:
            return "grant revoked"
        if now >= self.expires_at:
            return "grant expired"
        if self.downloads_left == 0:
            return "quota exhausted"
        return None

    def __repr__(self) -> str:
        used = f"{self.downloads_used}/{self.download_quota}"
        return f"Grant(id={self.id}, request_id={self.request_id}, expires_at={self.expires_at}, used={used}, revoked_at={self.revoked_at})"


class DownloadEvent(Base):
    """One download attempt: an authorization (ok or refused, with the reason) or a completed, verified copy."""

    __tablename__ = "download_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    grant_id: Mapped[int | None] = mapped_column(ForeignKey("grants.id"), index=True)
    """NULL when the token's signature was invalid: an unverified grant id is never trusted (it is in `detail`)."""
    at: Mapped[datetime]
    ok: Mapped[bool]
    detail: Mapped[str] = mapped_column(Text)
    files: Mapped[int] = mapped_column(default=0)
    size_bytes: Mapped[int] = mapped_column("bytes", BigInteger, default=0)  # BigInteger: one OPT-175B copy is ~350 GB


class AuditEntry(Base):
    """One action in the append-only audit log: who did what to which subject (`request:<id>`, `grant:<id>`)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(NAME_LEN))
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")
    """JSON object."""

    @property
    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.detail)
        return out

    def __repr__(self) -> str:
        return f"AuditEntry(id={self.id}, at={self.at}, actor={self.actor!r}, action={self.action}, subject={self.subject})"


def open_key_for(requester: str, model_name: str, model_version: str) -> str:
    """The uniqueness key of an open request: a hash, so its length does not depend on the names."""
    return hashlib.sha256(json.dumps([requester, model_name, model_version]).encode("utf-8")).hexdigest()


@event.listens_for(AuditEntry, "before_update")
def _refuse_audit_update(mapper: Mapper[AuditEntry], connection: Any, target: AuditEntry) -> None:
    raise AppendOnlyViolation(f"audit entry {target.id} cannot be changed: the audit log is append-only")


@event.listens_for(AuditEntry, "before_delete")
def _refuse_audit_delete(mapper: Mapper[AuditEntry], connection: Any, target: AuditEntry) -> None:
    raise AppendOnlyViolation(f"audit entry {target.id} cannot be deleted: the audit log is append-only")


def _refuse_bulk_audit_writes(state: ORMExecuteState) -> None:
    # Mapper events do not fire for bulk `session.execute(update(AuditEntry)...)`; this catches those.
    if not (state.is_update or state.is_delete):
        return
    table = getattr(state.statement, "table", None)
    mapper = state.bind_mapper
    if table is AuditEntry.__table__ or (mapper is not None and mapper.class_ is AuditEntry):
        raise AppendOnlyViolation("bulk UPDATE/DELETE of the audit log refused: the audit log is append-only")


def make_engine(db_url: str) -> Engine:
    """An engine for `db_url`, with the tables created on first use (and a SQLite file's directory)."""
    url = make_url(db_url)
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite and url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if is_sqlite:
        # SQLite ignores foreign keys unless asked, per connection; PostgreSQL always enforces them
        event.listen(engine, "connect", lambda dbapi_conn, _record: dbapi_conn.execute("PRAGMA foreign_keys=ON"))
    Base.metadata.create_all(engine)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose loaded objects stay readable after commit, with bulk audit-log rewrites refused."""
    factory = sessionmaker(engine, expire_on_commit=False)
    event.listen(factory, "do_orm_execute", _refuse_bulk_audit_writes)
    return factory
