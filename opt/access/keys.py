"""The access service's key material, which only the service holds.

- An Ed25519 key that signs every release's download manifest at publication. Its public half is served at
  `/v1/public-key` and printed by `optctl access serve`, so anyone can check a release offline: a file or manifest
  replaced later in MLflow, S3 or the release root no longer matches what was signed.
- A 32-byte secret that keys the audit log's hash chain (so whoever can write the database cannot rebuild a
  valid chain after editing it) and signs the short-lived file links of a local release root.

Both come from the environment (`$OPT_ACCESS_SIGNING_KEY`: the base64 of the 32-byte Ed25519 seed; the secret
from `access.secret_env`) or, on the embedded defaults, from files made once under the access home (directory
0700, files 0600). A file another user could read is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opt.access.errors import AccessError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SIGNING_KEY_ENV = "OPT_ACCESS_SIGNING_KEY"
SIGNING_KEY_FILE = "signing.key"
SECRET_FILE = "access.secret"
MIN_SECRET_BYTES = 16  # below this an HMAC key can be brute-forced offline from one leaked link


@dataclass(frozen=True)
class ServiceKeys:
    signing_seed: bytes
    secret: bytes

    def signing_key(self) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.signing_seed)

    @property
    def public_key(self) -> str:
        """The Ed25519 public key, base64 (32 raw bytes)."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = self.signing_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    @property
    def key_id(self) -> str:
        """A short fingerprint of the public key (16 hex digits of its sha256), to compare by eye."""
        return key_id(self.public_key)

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.signing_key().sign(data)).decode("ascii")


def key_id(public_key_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()[:16]


def verify_signature(public_key_b64: str, data: bytes, signature_b64: str) -> bool:
    """True if `signature_b64` is the Ed25519 signature of `data` under `public_key_b64` (both base64)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        key.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter (created 0700; an existing one is tightened to 0700)."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _read_or_create(path: Path, make: bytes) -> bytes:
    if not path.exists():
        private_dir(path.parent)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(make)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and never overwrites: of two first starts, one key wins and both use it
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise AccessError(f"{path} is open to other users (mode {mode:o}); run `chmod 600 {path}`")
    return path.read_bytes()


def load_keys(home: Path, secret_env: str = "OPT_ACCESS_SECRET") -> ServiceKeys:
    """The service's keys: from the environment if set there, else from (new) files under `home`."""
    value = os.environ.get(secret_env, "")
    secret = value.encode("utf-8") if value else _read_or_create(home / SECRET_FILE, secrets.token_bytes(32))
    if len(secret) < MIN_SECRET_BYTES:
        where = f"${secret_env}" if value else str(home / SECRET_FILE)
        raise AccessError(f"{where} holds {len(secret)} bytes; the service secret needs {MIN_SECRET_BYTES} or more")
    seed_b64 = os.environ.get(SIGNING_KEY_ENV, "")
    if seed_b64:
        try:
            seed = base64.b64decode(seed_b64, validate=True)
        except binascii.Error:
            seed = b""
        if len(seed) != 32:
            raise AccessError(f"${SIGNING_KEY_ENV} must be the base64 of a 32-byte Ed25519 seed (make one with `optctl access keygen`)")
    else:
        seed = _read_or_create(home / SIGNING_KEY_FILE, secrets.token_bytes(32))
        if len(seed) != 32:
            raise AccessError(f"{home / SIGNING_KEY_FILE} is not a 32-byte Ed25519 seed; move it away to make a new key")
    return ServiceKeys(signing_seed=seed, secret=secret)


def new_signing_seed() -> str:
    """A fresh Ed25519 seed, base64, for `$OPT_ACCESS_SIGNING_KEY`."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")
