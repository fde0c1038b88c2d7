"""The access package's errors: the bottom of its import graph, so every module (and the HTTP layer) shares them."""

from __future__ import annotations

from opt.errors import OptError


class AccessError(OptError, ValueError):
    """A request the access service cannot act on (bad input, unknown id, wrong state); the message says why."""


class AccessDenied(OptError, PermissionError):
    """Access refused by policy.

    `reason` is a short stable phrase ("grant revoked", "not a reviewer", ...) that callers and tests match on;
    the message adds what the user can do about it. Both are kept in `args` so the error pickles.
    """

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason, hint)
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return f"access denied: {self.reason}" + (f"; {self.hint}" if self.hint else "")


class NotFound(AccessError):
    """No such object, or none the caller may see (the two are not told apart, so ids cannot be probed)."""


class Conflict(AccessError):
    """The object exists but its state forbids the action (already reviewed, already revoked, duplicate)."""


class Unauthenticated(OptError):
    """No credentials, or credentials that are unknown, expired or revoked."""


class TamperedRelease(OptError):
    """A release's manifest signature or a file's sha256 does not match what the service signed at publication."""
