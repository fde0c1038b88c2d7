"""What every part of the access service shares: the database, the keys, the server's limits, the clock, and the
rule that every refusal is audited before it is raised."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session

from opt.access import audit
from opt.access.auth import Principal
from opt.access.db import make_engine, session_factory
from opt.access.errors import AccessDenied, AccessError
from opt.access.keys import ServiceKeys
from opt.access.names import clean_text
from opt.access.release import ReleaseStore

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Limits:
    """The server's bounds: a caller may ask for less, never for more."""

    grant_days: int = 30
    max_grant_days: int = 365
    download_quota: int = 5
    max_download_quota: int = 100
    link_ttl_seconds: int = 300
    """Lifetime of one file's link (a presigned S3 URL, or the service's own for a local release root)."""
    token_days: int = 90
    download_hours: int = 72
    """How long a started download can be resumed without taking another unit of quota."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AccessError(f"access limit {name} must be a whole number of at least 1, got {value!r}")
        if self.grant_days > self.max_grant_days or self.download_quota > self.max_download_quota:
            raise AccessError("access.grant_days and access.download_quota must not exceed their max_ bounds")


class Core:
    def __init__(
        self, db_url: str, keys: ServiceKeys, releases: ReleaseStore, limits: Limits | None = None, clock: Clock = utc_now,
        staging_root: str | None = None,
    ) -> None:  # fmt: skip
        self.limits = limits or Limits()
        self.staging_root = staging_root
        """Where publications over the API may be copied from (None: the API publishes nothing)."""
        self.keys = keys
        self.releases = releases
        self._clock = clock
        try:
            self._engine = make_engine(db_url)
        except (ArgumentError, NoSuchModuleError) as e:
            raise AccessError(f"access.db_url is not a usable SQLAlchemy URL: {e}") from e
        self._sessions = session_factory(self._engine)

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError(f"the access service clock returned a naive datetime {now!r}; it must be timezone-aware")
        return now.astimezone(UTC)

    def _audit(self, s: Session, actor: str, action: str, subject: str, detail: dict[str, Any] | None = None) -> None:
        audit.append(s, self.keys.secret, self._now(), actor, action, subject, detail or {})

    def _refuse(self, actor: Principal | str, action: str, subject: str, error: AccessError | AccessDenied) -> NoReturn:
        """Record a refused `action` (actor, object, reason) in its own transaction, then raise `error`."""
        name = actor.name if isinstance(actor, Principal) else actor
        reason = error.reason if isinstance(error, AccessDenied) else str(error)
        with self._sessions.begin() as s:
            self._audit(s, name, f"{action}.refused", subject, {"reason": reason})
        raise error

    def _need_reviewer(self, actor: Principal, action: str, subject: str) -> None:
        if not actor.is_reviewer:
            self._refuse(
                actor, action, subject, AccessDenied("not a reviewer", "only reviewers and admins review requests and revoke grants")
            )

    def _need_admin(self, actor: Principal, action: str, subject: str) -> None:
        if not actor.is_admin:
            self._refuse(actor, action, subject, AccessDenied("not an admin", "only admins manage accounts and publish releases"))

    def _text(self, actor: Principal | str, action: str, subject: str, raw: str, field: str, max_len: int, multiline: bool = False) -> str:
        """`clean_text(raw, ...)`, or the refusal (audited) that names what is wrong with it."""
        try:
            return clean_text(raw, field, max_len, multiline=multiline)
        except AccessError as e:
            self._refuse(actor, action, subject, e)

    def _bounded(self, actor: Principal, action: str, subject: str, field: str, value: int | None, default: int, most: int) -> int:
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
            self._refuse(
                actor, action, subject, AccessError(f"{field} must be a whole number from 1 to {most} (the server's limit), got {value!r}")
            )
        return value
