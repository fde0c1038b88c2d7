"""Short-lived file links for a local release root: what a presigned URL is for S3, signed by the service.

A token is `<payload>.<signature>`, both base64url without padding: the payload is compact JSON `{"d", "p", "exp",
"n"}` (download id, file path, expiry in unix seconds, nonce) and the signature is HMAC-SHA256 over the payload
text as it appears in the token, so there is exactly one valid spelling of every token and any changed
character is refused. A valid signature proves only that this service issued the link; whether the download's
grant still holds is checked against the database at each use, so revocation stops a link already issued.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from opt.access.errors import AccessDenied

MAX_TOKEN_CHARS = 4096  # real tokens are ~150 chars plus the path; refuse huge inputs before hashing them
LINK_INVALID = "link invalid"
LINK_EXPIRED = "link expired"


@dataclass(frozen=True)
class FileLink:
    download: int
    path: str
    exp: int
    """Expiry in unix seconds; the link is refused from this second on."""
    nonce: str

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.exp, UTC)


def sign(download: int, path: str, expires_at: datetime, secret: bytes) -> str:
    body = {"d": download, "p": path, "exp": int(expires_at.timestamp()), "n": secrets.token_urlsafe(9)}
    text = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8"))
    return f"{text}.{_mac(text, secret)}"


def verify(token: str, secret: bytes, now: datetime) -> FileLink:
    """The link behind a token this service signed and that has not expired; AccessDenied otherwise."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1 or not token.isascii():
        raise _invalid()
    body, signature = token.split(".")
    if not hmac.compare_digest(_mac(body, secret).encode("ascii"), signature.encode("ascii")):
        raise _invalid()
    try:
        d = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        link = FileLink(download=int(d["d"]), path=str(d["p"]), exp=int(d["exp"]), nonce=str(d["n"]))
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise _invalid() from None
    if now.timestamp() >= link.exp:
        raise AccessDenied(LINK_EXPIRED, f"it expired at {link.expires_at:%Y-%m-%d %H:%M:%S} UTC; run the download again for fresh links")
    return link


def _mac(body: str, secret: bytes) -> str:
    return _b64(hmac.new(secret, b"file-link|" + body.encode("ascii"), hashlib.sha256).digest())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _invalid() -> AccessDenied:
    return AccessDenied(LINK_INVALID, "the link was altered or not issued by this service; run the download again")
