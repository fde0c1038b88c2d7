"""The audit log: append-only and hash-chained, keyed with the service secret.

Entry n carries `prev_hash` (entry n-1's `entry_hash`; 64 zeros for the first), `entry_hash` = sha256 of its own
canonical content (position, time, actor, action, subject, detail, prev_hash) and `mac` = HMAC-SHA256(secret,
entry_hash). Someone who can write the database but lacks the secret can change, remove or reorder entries, but
cannot make the macs and hashes agree again; `verify` walks the chain and names the first entry that breaks it.
The head row (`audit_head`, keyed too) records the chain's length, so dropping entries from the end shows as well.
Appends lock the head row (FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises writers), so
concurrent requests never fork the chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from opt.access.db import AuditEntry, AuditHead

GENESIS = "0" * 64


def _content_hash(seq: int, at: datetime, actor: str, action: str, subject: str, detail: str, prev_hash: str) -> str:
    body = json.dumps([seq, at.isoformat(timespec="microseconds"), actor, action, subject, detail, prev_hash], separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _mac(secret: bytes, *parts: object) -> str:
    return hmac.new(secret, "|".join(str(p) for p in parts).encode("utf-8"), hashlib.sha256).hexdigest()


def append(s: Session, secret: bytes, at: datetime, actor: str, action: str, subject: str, detail: dict[str, Any]) -> AuditEntry:
    """Add one entry at the end of the chain, in the caller's transaction (so it commits with the change it records)."""
    head = s.scalars(select(AuditHead).where(AuditHead.id == 1).with_for_update()).one_or_none()
    seq, prev = (head.seq + 1, head.entry_hash) if head else (1, GENESIS)
    text = json.dumps(detail, sort_keys=True, default=str, ensure_ascii=False)
    digest = _content_hash(seq, at, actor, action, subject, text, prev)
    entry = AuditEntry(
        id=seq, at=at, actor=actor, action=action, subject=subject, detail=text, prev_hash=prev, entry_hash=digest, mac=_mac(secret, digest)
    )
    s.add(entry)
    head_mac = _mac(secret, "head", seq, digest)
    if head is None:
        s.add(AuditHead(id=1, seq=seq, entry_hash=digest, mac=head_mac))
    else:
        head.seq, head.entry_hash, head.mac = seq, digest, head_mac
    s.flush()
    return entry


@dataclass(frozen=True)
class ChainReport:
    """The result of `verify`: `ok`, how many entries were checked, and the first break found."""

    ok: bool
    entries: int
    problem: str | None = None
    entry: int | None = None
    """The chain position of the first entry that was changed, removed or moved (None when ok)."""


def verify(s: Session, secret: bytes) -> ChainReport:
    """Walk the whole chain and the head row; report the first entry that was changed, removed or reordered."""
    prev, expected, n = GENESIS, 1, 0
    for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id)).yield_per(1000):
        n += 1
        digest = _content_hash(e.id, e.at, e.actor, e.action, e.subject, e.detail, e.prev_hash)
        if not hmac.compare_digest(e.mac, _mac(secret, e.entry_hash)):
            return ChainReport(False, n, f"entry {e.id} does not carry the service's mac: it was rewritten or forged", e.id)
        if digest != e.entry_hash:
            return ChainReport(False, n, f"entry {e.id} was changed: its content no longer matches its hash", e.id)
        if e.id != expected:
            gap = f"{expected}" if e.id == expected + 1 else f"{expected}-{e.id - 1}"
            return ChainReport(False, n, f"entries {gap} were removed (the chain goes from {expected - 1} to {e.id})", expected)
        if e.prev_hash != prev:
            return ChainReport(False, n, f"entry {e.id} does not follow entry {e.id - 1}: entries were reordered or replaced", e.id)
        prev, expected = e.entry_hash, expected + 1
    head = s.get(AuditHead, 1)
    last = expected - 1
    if head is None:
        return ChainReport(last == 0, n, None if last == 0 else "the chain's head record is missing", None if last == 0 else last)
    if not hmac.compare_digest(head.mac, _mac(secret, "head", head.seq, head.entry_hash)):
        return ChainReport(False, n, "the chain's head record was rewritten", head.seq)
    if head.seq != last or head.entry_hash != prev:
        if head.seq > last:
            return ChainReport(False, n, f"entries {last + 1}-{head.seq} were removed from the end of the chain", last + 1)
        return ChainReport(False, n, f"the chain's head says entry {head.seq} is the newest, but it goes on to {last}", head.seq)
    return ChainReport(True, n)
