"""Signing in to the portal: argon2id passwords and browser sessions, each with its own CSRF token.

A session token lives in an HttpOnly, SameSite=Lax cookie (Secure under TLS); the database keeps only its
sha256. Every form the portal renders carries the session's CSRF token, and every POST is refused without it
(opt/access/pages.py). A wrong name and a wrong password get the same answer, and take the same time (an unknown
name is checked against a dummy hash). Sign-ins, refusals, password changes and sign-outs are audited.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta

from sqlalchemy import select

from opt.access.accounts import Accounts
from opt.access.auth import Principal, token_hash
from opt.access.db import Role, User, WebSession
from opt.access.errors import AccessError, NotFound, Unauthenticated
from opt.access.names import normalise_name

MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # argon2 hashes any length; a bound keeps a sign-in's cost bounded
SESSION_PREFIX = "opts_"


def _hasher():  # type: ignore[no-untyped-def]
    from argon2 import PasswordHasher  # argon2-cffi: loaded by the portal only

    return PasswordHasher()  # argon2id, the library's current parameters (RFC 9106's second recommendation)


_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = _hasher().hash(secrets.token_urlsafe(16))
    return _DUMMY_HASH


class WebSessions(Accounts):
    session_hours: int = 12

    def set_password(self, name: str, password: str, by: str = "operator") -> None:
        """Give an account a password for the portal (an operator, or the account itself)."""
        if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
            raise AccessError(f"a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters; choose a longer one")
        norm = normalise_name(name, "account name")
        digest = _hasher().hash(password)
        with self._sessions.begin() as s:
            user = s.scalars(select(User).where(User.name == norm)).one_or_none()
            if user is None:
                raise NotFound(f"no account {norm!r}")
            user.password_hash = digest
            self._audit(s, by, "user.password_set", f"user:{user.id}", {"name": norm})

    def sign_in(self, name: str, password: str, client: str) -> tuple[str, str]:
        """(session token, CSRF token) for a right name and password; Unauthenticated, audited, otherwise."""
        from argon2.exceptions import InvalidHashError, VerificationError

        try:
            norm = normalise_name(name, "account name")
        except AccessError:
            norm = ""
        with self._sessions() as s:
            user = s.scalars(select(User).where(User.name == norm)).one_or_none() if norm else None
        stored = user.password_hash if user is not None and user.disabled_at is None else None
        try:
            ok = _hasher().verify(stored or _dummy_hash(), password[:MAX_PASSWORD_CHARS]) and stored is not None
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or user is None:
            with self._sessions.begin() as s:
                self._audit(s, norm[:64] or "anonymous", "signin.refused", "portal", {"client": client, "reason": "wrong name or password"})
            raise Unauthenticated("wrong account name or password")
        token, csrf, now = SESSION_PREFIX + secrets.token_urlsafe(32), secrets.token_urlsafe(32), self._now()
        with self._sessions.begin() as s:
            row = WebSession(token_hash=token_hash(token), csrf_token=csrf, user_id=user.id, created_at=now,
                             expires_at=now + timedelta(hours=self.session_hours))  # fmt: skip
            s.add(row)
            s.flush()
            self._audit(s, user.name, "signin", f"session:{row.id}", {"client": client})
        return token, csrf

    def session(self, token: str | None) -> tuple[Principal, str] | None:
        """The signed-in account and its CSRF token for a session cookie, or None (unknown, ended, expired, disabled)."""
        if not token or not token.startswith(SESSION_PREFIX) or len(token) > 100:
            return None
        with self._sessions() as s:
            row = s.scalars(select(WebSession).where(WebSession.token_hash == token_hash(token))).one_or_none()
            if row is None or row.ended_at is not None or row.expires_at <= self._now() or row.user.disabled_at is not None:
                return None
            return Principal(row.user.id, row.user.name, Role(row.user.role)), row.csrf_token

    def sign_out(self, token: str) -> None:
        with self._sessions.begin() as s:
            row = s.scalars(select(WebSession).where(WebSession.token_hash == token_hash(token))).one_or_none()
            if row is not None and row.ended_at is None:
                row.ended_at = self._now()
                self._audit(s, row.user.name, "signout", f"session:{row.id}", {})


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
