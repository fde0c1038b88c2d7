"""The access database (SQLAlchemy 2 ORM; the schema is Alembic's `opt/access/migrations`).

Portable SQL only, so the same models run on the embedded SQLite file and on PostgreSQL. Invariants kept by
plain unique constraints: one account per normalised name and per look-alike skeleton; one release per model
version; one grant per request; one open (pending or approved) request per account and release (`open_key`
holds a hash of the two while the request is open and NULL once it is closed; NULLs never collide).

Datetimes are timezone-aware UTC in Python whatever the backend stores (`UTCDateTime`). On SQLite every
transaction is BEGIN IMMEDIATE: writers queue instead of failing half-way, which also serialises the audit
chain; on PostgreSQL the chain's head row is locked FOR UPDATE (`audit.py`).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Dialect, ForeignKey, String, Text, TypeDecorator, UniqueConstraint, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, ORMExecuteState, Session, mapped_column, relationship, sessionmaker

MODEL_LEN = 200
EMAIL_LEN = 320  # RFC 5321: 64 local + @ + 255 domain
TEXT_LEN = 200  # affiliation, token label


class Role(StrEnum):
    RESEARCHER = "researcher"
    REVIEWER = "reviewer"
    ADMIN = "admin"


class OrganisationKind(StrEnum):
    """Who was eligible for OPT-175B: academic researchers, government, civil society, industry research labs."""

    ACADEMIC = "academic"
    GOVERNMENT = "government"
    CIVIL_SOCIETY = "civil-society"
    INDUSTRY_RESEARCH_LAB = "industry-research-lab"


class RequestStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    REVOKED = "revoked"


class AppendOnlyViolation(RuntimeError):
    """Code tried to update or delete an audit entry through the ORM; the audit log only grows."""


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out. SQLite stores naive values: we store UTC and re-attach it."""

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


def _check(column: str, enum: type[StrEnum], name: str) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(str(v)) for v in enum)})", name=name)


class User(Base):
    """An account on the access service. `name` is normalised (`names.normalise_name`), `skeleton` its look."""

    __tablename__ = "users"
    __table_args__ = (_check("role", Role, "ck_users_role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    skeleton: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str] = mapped_column(String(EMAIL_LEN))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    disabled_at: Mapped[datetime | None]
    password_hash: Mapped[str | None] = mapped_column(String(200))
    """argon2id hash for signing in to the portal; None: API tokens only (`optctl access user password` sets it)."""


class ApiToken(Base):
    """A personal API token: only its sha256 is stored; the token itself is shown once, when it is made."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(TEXT_LEN))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(lazy="joined")


class Release(Base):
    """A gated model version as published: where its files are, and the manifest the service signed."""

    __tablename__ = "releases"
    __table_args__ = (
        UniqueConstraint("model_name", "model_version", name="uq_releases_version"),
        CheckConstraint("gate IN ('passed', 'failed', 'overridden')", name="ck_releases_gate"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_name: Mapped[str] = mapped_column(String(MODEL_LEN))
    model_version: Mapped[str] = mapped_column(String(64))
    location: Mapped[str] = mapped_column(Text)
    """URI of the folder (local path or s3:// prefix) under the release root that holds the files."""
    manifest: Mapped[str] = mapped_column(Text)
    """Canonical JSON: model, version, files (path, size, sha256), licence_sha256; this exact text is signed."""
    signature: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str] = mapped_column(String(16))
    licence: Mapped[str] = mapped_column(Text)
    licence_sha256: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[datetime]
    gate: Mapped[str] = mapped_column(String(16), default="passed", server_default="passed")
    """The registry's verdict: `passed`, `failed` (nobody may request it), or `overridden` by a promotion."""
    gate_reasons: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    """JSON list: the gate's reasons, failed checks first."""


class AccessRequest(Base):
    """An account's request for one release."""

    __tablename__ = "access_requests"
    __table_args__ = (
        _check("status", RequestStatus, "ck_access_requests_status"),
        _check("organisation_kind", OrganisationKind, "ck_access_requests_organisation_kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    affiliation: Mapped[str] = mapped_column(String(TEXT_LEN))
    organisation_kind: Mapped[str] = mapped_column(String(32))
    purpose: Mapped[str] = mapped_column(Text)
    licence_sha256: Mapped[str] = mapped_column(String(64))
    """The licence text the requester accepted (it must be the release's)."""
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.PENDING)
    created_at: Mapped[datetime]
    decided_at: Mapped[datetime | None]
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    decision_reason: Mapped[str | None] = mapped_column(Text)
    first_approved_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    """Under two-person approval (`access.two_person_models`): the first reviewer's approval; a second reviewer grants."""
    first_approved_at: Mapped[datetime | None]
    open_key: Mapped[str | None] = mapped_column(String(64), unique=True)

    user: Mapped[User] = relationship(lazy="joined", foreign_keys=[user_id])
    release: Mapped[Release] = relationship(lazy="joined")


class Grant(Base):
    """An approved request: downloads of one release until `expires_at`, `download_quota` of them."""

    __tablename__ = "grants"
    __table_args__ = (CheckConstraint("downloads_used >= 0 AND downloads_used <= download_quota", name="ck_grants_quota"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("access_requests.id"), unique=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    download_quota: Mapped[int]
    downloads_used: Mapped[int] = mapped_column(default=0)
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    revoke_reason: Mapped[str | None] = mapped_column(Text)

    request: Mapped[AccessRequest] = relationship(lazy="joined")

    @property
    def downloads_left(self) -> int:
        return max(0, self.download_quota - self.downloads_used)

    def refusal_reason(self, now: datetime) -> str | None:
        """Why the grant cannot be used at `now` ("grant revoked", "grant expired"), or None if it is in force."""
        if self.revoked_at is not None:
            return "grant revoked"
        if now >= self.expires_at:
            return "grant expired"
        return None


class WebSession(Base):
    """A signed-in browser: the cookie holds the session token, of which only the sha256 is stored here, and every
    form carries the session's own CSRF token."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(lazy="joined")


class OutboxMessage(Base):
    """An email to send, written in the same transaction as the decision it tells of: a mail outage never blocks
    or loses a decision, and the sender retries (with backoff) until the SMTP server takes the message."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(primary_key=True)
    to_addr: Mapped[str] = mapped_column(String(EMAIL_LEN))
    subject: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))
    """request.created, request.approved, request.denied, grant.revoked, digest"""
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    sent_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class Download(Base):
    """One whole download of a release under a grant: it took one unit of quota when it started, and files are
    served under it (again, after a dropped connection) until it completes or expires."""

    __tablename__ = "downloads"

    id: Mapped[int] = mapped_column(primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"), index=True)
    started_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    files_served: Mapped[int] = mapped_column(default=0)
    """File links handed out under it (each file served is an audit entry, `file.served`)."""

    grant: Mapped[Grant] = relationship(lazy="joined")


class AuditEntry(Base):
    """One entry of the hash-chained audit log; `id` is its position in the chain (1, 2, ...)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")
    """JSON object."""
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))
    """HMAC-SHA256 of entry_hash under the service secret: without the secret no entry can be re-made."""


class AuditHead(Base):
    """The newest entry of the chain (one row): the point appends lock, and a keyed record of the chain's length."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    entry_hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


@event.listens_for(AuditEntry, "before_update")
def _refuse_audit_update(mapper: Mapper[AuditEntry], connection: Any, target: AuditEntry) -> None:
    raise AppendOnlyViolation(f"audit entry {target.id} cannot be changed: the audit log is append-only")


@event.listens_for(AuditEntry, "before_delete")
def _refuse_audit_delete(mapper: Mapper[AuditEntry], connection: Any, target: AuditEntry) -> None:
    raise AppendOnlyViolation(f"audit entry {target.id} cannot be deleted: the audit log is append-only")


def _refuse_bulk_audit_writes(state: ORMExecuteState) -> None:
    # Mapper events do not fire for bulk `session.execute(update(AuditEntry)...)`; this catches those. A raw
    # text() statement passes both: the keyed hash chain is what catches it (`optctl access audit verify`).
    if not (state.is_update or state.is_delete):
        return
    table = getattr(state.statement, "table", None)
    mapper = state.bind_mapper
    if table is AuditEntry.__table__ or (mapper is not None and mapper.class_ is AuditEntry):
        raise AppendOnlyViolation("bulk UPDATE/DELETE of the audit log refused: the audit log is append-only")


def rowcount(result: Any) -> int:
    """Rows a conditional UPDATE changed: 1 for the caller that won a race, 0 for the others."""
    return int(getattr(result, "rowcount", 0))


def make_engine(db_url: str) -> Engine:
    """An engine for `db_url`, its schema migrated to the newest version. A new SQLite file is made mode 0600."""
    from sqlalchemy import create_engine

    url = make_url(db_url)
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite and url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        path = Path(url.database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # before SQLite makes it with the umask
    engine = create_engine(url, connect_args={"timeout": 30} if is_sqlite else {})
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # pysqlite's own transaction handling off: we issue BEGIN ourselves
            dbapi_conn.execute("PRAGMA foreign_keys=ON")  # SQLite ignores foreign keys unless asked, per connection

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    from opt.access.migrations import upgrade

    upgrade(engine)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose loaded objects stay readable after commit, with bulk audit-log rewrites refused."""
    factory = sessionmaker(engine, expire_on_commit=False)
    event.listen(factory, "do_orm_execute", _refuse_bulk_audit_writes)
    return factory
