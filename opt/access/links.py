"""Signed, expiring download links, the signing secret, and the access package's errors.

A token is `<payload>.<signature>`, both base64url without padding: the payload is compact JSON
`{"grant", "model", "version", "exp", "nonce"}` (exp in unix seconds) and the signature is
HMAC-SHA256 over the payload text as it appears in the token. Signing the text rather than the decoded
JSON means there is exactly one valid spelling of every token: any changed character is refused.

A valid signature proves only that this service issued the link; whether it may still be used
(grant revoked or expired, quota left, version scope) is decided by the service against the database,
which is why revocation takes effect at once.

The errors live here because this module is the bottom of the package's import graph.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from opt.errors import OptError

LINK_SCHEME = "opt-download:"
SECRET_FILE = "access.secret"
MIN_SECRET_BYTES = 16  # below this an HMAC key can be brute-forced offline from one leaked link
MAX_TOKEN_CHARS = 4096  # real tokens are ~200 chars; refuse huge inputs before hashing them

SIGNATURE_INVALID = "signature invalid"
LINK_EXPIRED = "link expired"


class AccessError(OptError, ValueError):
    """A request the access service cannot act on (bad input, unknown id, wrong state); the message says why."""


class AccessDenied(OptError, PermissionError):
    """Access refused by policy.

    `reason` is a short stable phrase ("link expired", "grant revoked", ...) that callers and tests match on;
    the message adds what the user can do about it. Both are kept in `args` so the error pickles.
    """

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason, hint)
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return f"access denied: {self.reason}" + (f"; {self.hint}" if self.hint else "")


@dataclass(frozen=True)
class LinkPayload:
    """What a download link carries: the grant it draws on, its scope (one model version) and its expiry."""

    grant: int
    model: str
    version: str
    exp: int
    """Expiry in unix seconds; the link is refused from this second on."""
    nonce: str
    """Random per link, so two links for the same grant never share a token (and audit entries can tell them apart)."""

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.exp, UTC)

    def expired(self, now: datetime) -> bool:
        """True once `now` (timezone-aware) has reached the expiry second."""
        return now.timestamp() >= self.exp


@dataclass(frozen=True)
class DownloadLink:
    """A link handed to a researcher: the bearer token, the same as an `opt-download:` URL, and when it expires."""

    grant_id: int
    token: str
    url: str
    expires_at: datetime


def new_payload(grant: int, model: str, version: str, expires_at: datetime) -> LinkPayload:
    """A payload with a fresh nonce; `expires_at` is rounded down to the second."""
    return LinkPayload(grant=grant, model=model, version=version, exp=int(expires_at.timestamp()), nonce=secrets.token_urlsafe(12))


def sign(payload: LinkPayload, secret: bytes) -> str:
    """The token for `payload`, signed with `secret` (at least 16 bytes)."""
    check_secret(secret)
    body = _b64encode(json.dumps(_to_dict(payload), separators=(",", ":"), sort_keys=True).encode("utf-8"))
    return f"{body}.{_mac(body, secret)}"


def verify_signature(token: str, secret: bytes) -> LinkPayload:
    """The payload of a token this service signed, whatever its expiry; raises AccessDenied("signature invalid")."""
    check_secret(secret)
    token = token.removeprefix(LINK_SCHEME) if isinstance(token, str) else ""
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1 or not token.isascii():
        raise _bad_signature()
    body, signature = token.split(".")
    if not hmac.compare_digest(_mac(body, secret).encode("ascii"), signature.encode("ascii")):
        raise _bad_signature()
    payload = _decode(body)
    if payload is None:  # signed by us yet unreadable: the secret is shared with something else
        raise _bad_signature()
    return payload


def verify(token: str, secret: bytes, now: datetime) -> LinkPayload:
    """The payload of a valid, unexpired token; raises AccessDenied("signature invalid" or "link expired")."""
    payload = verify_signature(token, secret)
    if payload.expired(now):
        raise AccessDenied(LINK_EXPIRED, f"the link expired at {payload.expires_at:%Y-%m-%d %H:%M:%S} UTC; ask for a new one")
    return payload


def peek(token: str) -> LinkPayload | None:
    """The payload a token claims, WITHOUT checking its signature: only for describing refused tokens in the audit log."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        return None
    return _decode(token.removeprefix(LINK_SCHEME).partition(".")[0])


def load_secret(env_name: str, home: Path) -> bytes:
    """The link-signing secret: `$env_name` if set, else `home/access.secret` (32 random bytes, mode 0600, created once)."""
    value = os.environ.get(env_name, "")
    if value:
        secret = value.encode("utf-8")
        if len(secret) < MIN_SECRET_BYTES:
            raise AccessError(f"${env_name} holds {len(secret)} bytes; the link-signing secret needs {MIN_SECRET_BYTES} or more")
        return secret
    path = home / SECRET_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f".{SECRET_FILE}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and never overwrites: of two first starts, one secret wins and both use it
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise AccessError(f"{path} is open to other users (mode {mode:o}); run `chmod 600 {path}`")
    secret = path.read_bytes()
    if len(secret) < MIN_SECRET_BYTES:
        raise AccessError(f"{path} holds {len(secret)} bytes; the link-signing secret needs {MIN_SECRET_BYTES} or more")
    return secret


def check_secret(secret: bytes) -> None:
    """Raise AccessError unless `secret` is bytes long enough to be an HMAC key."""
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise AccessError(f"the link-signing secret must be at least {MIN_SECRET_BYTES} bytes")


def _to_dict(p: LinkPayload) -> dict[str, int | str]:
    return {"grant": p.grant, "model": p.model, "version": p.version, "exp": p.exp, "nonce": p.nonce}


def _decode(body: str) -> LinkPayload | None:
    try:
        d = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if not isinstance(d, dict) or set(d) != {"grant", "model", "version", "exp", "nonce"}:
        return None
    types_ok = all(isinstance(d[k], int) and not isinstance(d[k], bool) for k in ("grant", "exp")) and all(
        isinstance(d[k], str) for k in ("model", "version", "nonce")
    )
    return LinkPayload(**d) if types_ok else None


def _mac(body: str, secret: bytes) -> str:
    return _b64encode(hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest())


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _bad_signature() -> AccessDenied:
    return AccessDenied(SIGNATURE_INVALID, "the link was altered or not issued by this service; use the link exactly as issued")
