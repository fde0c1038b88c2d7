"""Who is calling: personal API tokens (stored hashed) behind one seam, `Authenticator`.

A token is `opt_` + 43 base64url characters (32 random bytes); the database keeps only its sha256, so a copy of
the database hands out no working token. Tokens expire (`access.token_days`) and can be revoked by their owner
or an admin. The HTTP layer asks an `Authenticator` for the `Principal` behind a request and never looks at
credentials itself, so the portal's password sessions and an institution's OIDC login plug in beside
`TokenAuthenticator` without touching the routes or the rules.

Failed attempts are counted per client address (`FailureLimiter`): after `max_failures` within `window_s`
seconds further attempts from there are refused with 429 until the window has passed, so tokens cannot be
guessed at network speed. (A random 256-bit token cannot be guessed anyway; the limit keeps the log readable
and the database idle.)
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from opt.access.db import Role

TOKEN_PREFIX = "opt_"
TOKEN_CHARS = len(TOKEN_PREFIX) + 43
MAX_CREDENTIAL_CHARS = 512  # anything longer is refused before it is hashed or looked up


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the account's id, normalised name and role."""

    user_id: int
    name: str
    role: Role

    @property
    def is_reviewer(self) -> bool:
        return self.role in (Role.REVIEWER, Role.ADMIN)

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_token(token: str) -> bool:
    return len(token) == TOKEN_CHARS and token.startswith(TOKEN_PREFIX) and token.isascii()


class Authenticator(Protocol):
    """Turns a request's credentials into a Principal (or None when it carries none this authenticator knows)."""

    def authenticate(self, authorization: str | None) -> Principal | None: ...


class TokenLookup(Protocol):
    def principal_for_token(self, token: str) -> Principal | None: ...


class TokenAuthenticator:
    """`Authorization: Bearer opt_...` against the service's token table."""

    def __init__(self, lookup: TokenLookup) -> None:
        self._lookup = lookup

    def authenticate(self, authorization: str | None) -> Principal | None:
        if not authorization or len(authorization) > MAX_CREDENTIAL_CHARS:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not looks_like_token(token.strip()):
            return None
        return self._lookup.principal_for_token(token.strip())


class FailureLimiter:
    """At most `max_failures` failed authentications per client address in any `window_s` seconds."""

    def __init__(self, max_failures: int = 10, window_s: float = 60.0, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        q = self._failures.setdefault(client, deque())
        while q and now - q[0] >= self.window_s:
            q.popleft()
        return q

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None if it may try now."""
        with self._lock:
            now = self._clock()
            q = self._recent(client, now)
            if len(q) < self.max_failures:
                return None
            return max(0.0, self.window_s - (now - q[0]))

    def failed(self, client: str) -> None:
        with self._lock:
            now = self._clock()
            self._recent(client, now).append(now)
            if len(self._failures) > 100_000:  # bounded memory under a flood of addresses
                self._failures = {k: v for k, v in self._failures.items() if v}
