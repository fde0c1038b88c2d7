"""The keyed hash chain: every edit, removal, reordering or truncation of the audit log is found and named."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from opt.access.auth import Principal
from opt.access.db import Role
from opt.access.errors import AccessError
from opt.access.server import build_service
from opt.config import AccessConfig

ADMIN = Principal(0, "operator", Role.ADMIN)


def _service(tmp_path: Path, db_url: str | None = None):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    return build_service(AccessConfig(home=str(home), db_url=db_url or f"sqlite:///{home / 'access.db'}", release_root=str(home / "rel")))


@pytest.fixture
def service(tmp_path: Path):  # type: ignore[no-untyped-def]
    svc = _service(tmp_path)
    for i in range(6):
        svc.add_user(f"user{i}", f"u{i}@uni.edu", "researcher")  # 12 entries: a token and an account each
    yield svc
    svc.close()


def _sql(svc, statement: str, **params) -> None:  # type: ignore[no-untyped-def]
    with svc._sessions.begin() as s:  # the service's own session: only the chain can tell
        s.execute(text(statement), params)


def test_an_untouched_chain_verifies(service) -> None:  # type: ignore[no-untyped-def]
    report = service.verify_audit(ADMIN)
    assert report.ok and report.entries == 12


def test_a_changed_entry_is_named(service) -> None:  # type: ignore[no-untyped-def]
    _sql(service, "UPDATE audit_log SET actor = 'someone-else' WHERE id = 5")
    report = service.verify_audit(ADMIN)
    assert not report.ok and report.entry == 5 and "entry 5 was changed" in report.problem


def test_a_rebuilt_entry_without_the_key_is_named(service) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    from opt.access.audit import _content_hash

    with service._sessions() as s:
        e = s.execute(text("SELECT id, at, actor, action, subject, detail, prev_hash FROM audit_log WHERE id = 4")).one()
    from datetime import UTC, datetime

    at = datetime.fromisoformat(str(e.at)).replace(tzinfo=UTC)
    digest = _content_hash(e.id, at, "mallory", e.action, e.subject, e.detail, e.prev_hash)  # a consistent hash...
    _sql(
        service,
        "UPDATE audit_log SET actor = 'mallory', entry_hash = :h, mac = :m WHERE id = 4",
        h=digest,
        m=hashlib.sha256(b"x").hexdigest(),
    )
    report = service.verify_audit(ADMIN)
    assert not report.ok and report.entry == 4 and "mac" in report.problem  # ...but no mac without the secret


def test_a_removed_entry_is_named(service) -> None:  # type: ignore[no-untyped-def]
    _sql(service, "DELETE FROM audit_log WHERE id IN (7, 8)")
    report = service.verify_audit(ADMIN)
    assert not report.ok and report.entry == 7 and "entries 7-8 were removed" in report.problem


def test_reordered_entries_are_named(service) -> None:  # type: ignore[no-untyped-def]
    _sql(service, "UPDATE audit_log SET id = -1 WHERE id = 9")
    _sql(service, "UPDATE audit_log SET id = 9 WHERE id = 10")
    _sql(service, "UPDATE audit_log SET id = 10 WHERE id = -1")
    report = service.verify_audit(ADMIN)
    assert not report.ok and report.entry == 9  # entry 9's content is entry 10's: its hash names position 10
    assert "entry 9" in report.problem


def test_entries_cut_from_the_end_are_named(service) -> None:  # type: ignore[no-untyped-def]
    _sql(service, "DELETE FROM audit_log WHERE id > 10")
    report = service.verify_audit(ADMIN)
    assert not report.ok and "entries 11-12 were removed from the end" in report.problem


def test_a_revocation_undone_in_sql_is_caught(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    (src := tmp_path / "src").mkdir()
    (src / "w.bin").write_bytes(b"weights")
    svc.publish_release("m", "1", src, ["w.bin"], "licence")
    alice, _ = svc.add_user("alice", "a@uni.edu", "researcher")
    bob, _ = svc.add_user("bob", "b@uni.edu", "reviewer")
    a, b = Principal(alice.id, "alice", Role.RESEARCHER), Principal(bob.id, "bob", Role.REVIEWER)
    rel = svc.release(a, "m", "1")
    req = svc.request_access(a, "m", "1", "Uni", "academic", "A long enough research purpose", rel.licence_sha256)
    grant = svc.approve(b, req.id)
    svc.revoke(b, grant.id, "breach")
    _sql(svc, "UPDATE grants SET revoked_at = NULL")  # the grant works again...
    _sql(svc, "DELETE FROM audit_log WHERE action = 'grant.revoked'")  # ...and its trace is gone
    report = svc.verify_audit(b)
    assert not report.ok and "removed" in report.problem
    svc.close()


def test_keys_database_and_release_root_are_the_owners_alone(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    home = tmp_path / "home"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and stat.S_IMODE((home / "rel").stat().st_mode) == 0o700
    for f in ("access.secret", "signing.key", "access.db"):
        assert stat.S_IMODE((home / f).stat().st_mode) == 0o600, f
    svc.close()
    os.chmod(home / "signing.key", 0o644)
    with pytest.raises(AccessError, match="open to other users"):
        _service(tmp_path)


def test_the_schema_migrates_and_the_chain_holds_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    from sqlalchemy import create_engine, inspect

    svc = _service(tmp_path, postgres_url)
    try:
        svc.add_user("pg-user", "pg@uni.edu", "researcher")
        assert svc.verify_audit(ADMIN).ok
        tables = set(inspect(create_engine(postgres_url)).get_table_names())
        assert {"alembic_version", "users", "api_tokens", "releases", "access_requests", "grants", "downloads", "audit_log"} <= tables
        _sql(svc, "UPDATE audit_log SET detail = '{}' WHERE id = 1")
        assert svc.verify_audit(ADMIN).entry == 1
    finally:
        svc.close()
