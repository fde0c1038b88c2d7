"""The access workflow on a SQLite file, with a fake clock that tests advance instead of sleeping."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from opt.access import AccessDenied, AccessError, AccessRequest, AccessService, AppendOnlyViolation, AuditEntry, Grant, RequestStatus
from opt.access.db import Base
from opt.config import AccessConfig

SECRET = b"s" * 32
PURPOSE = "Measuring toxicity and bias of large language models for a survey paper"
MODEL, VERSION = "opt-175b", "3"


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def svc(tmp_path: Path, clock: FakeClock) -> Iterator[AccessService]:
    service = AccessService(
        f"sqlite:///{tmp_path}/db/access.db", SECRET, link_ttl_seconds=3600, grant_days=30, download_quota=5, clock=clock
    )
    yield service
    service.close()


def _request(svc: AccessService, requester: str = "alice", version: str = VERSION) -> AccessRequest:
    return svc.request_access(requester, f"{requester}@uni.example.edu", "Example University", PURPOSE, MODEL, version)


def _grant(svc: AccessService, requester: str = "alice", **approve: int) -> Grant:
    return svc.approve(_request(svc, requester).id, "bob", **approve)


def _refused(svc: AccessService, token: str, version: str = VERSION) -> str:
    with pytest.raises(AccessDenied) as exc:
        svc.authorize_download(token, MODEL, version)
    return exc.value.reason


def test_happy_path_request_approve_link_download(svc: AccessService, clock: FakeClock) -> None:
    req = _request(svc)
    assert req.status == RequestStatus.PENDING and req.created_at == clock.now
    assert [r.id for r in svc.list_requests("pending")] == [req.id]

    grant = svc.approve(req.id, "bob")
    assert grant.request.status == RequestStatus.APPROVED
    assert grant.expires_at == clock.now + timedelta(days=30) and grant.expires_at.tzinfo is not None
    assert (grant.download_quota, grant.downloads_used) == (5, 0)
    assert svc.grant_for_request(req.id) is not None

    clock.advance(minutes=5)
    link = svc.issue_link(grant.id, "alice")
    assert link.url == f"opt-download:{link.token}" and link.expires_at == clock.now + timedelta(hours=1)

    clock.advance(minutes=10)
    authorized = svc.authorize_download(link.url, MODEL, VERSION)
    assert authorized.id == grant.id and authorized.request.requester == "alice"
    done = svc.record_download(grant.id, files=992, size_bytes=350 * 10**9)
    assert (done.downloads_used, done.downloads_left) == (1, 4)

    events = svc.download_events(grant.id)
    assert [(e.ok, e.detail, e.files, e.size_bytes) for e in events] == [(True, "authorized", 0, 0), (True, "completed", 992, 350 * 10**9)]
    actions = [(e.actor, e.action, e.subject) for e in svc.audit()]
    assert actions == [
        ("alice", "request.created", f"request:{req.id}"),
        ("bob", "request.approved", f"request:{req.id}"),
        ("alice", "link.issued", f"grant:{grant.id}"),
        ("alice", "download.authorized", f"grant:{grant.id}"),
        ("alice", "download.completed", f"grant:{grant.id}"),
    ]
    assert link.token not in str([e.detail for e in svc.audit()])  # a bearer credential never lands in the log


def test_no_link_without_approval(svc: AccessService) -> None:
    pending = _request(svc)
    assert svc.grant_for_request(pending.id) is None
    with pytest.raises(AccessError, match="no grant 1"):
        svc.issue_link(1, "alice")
    denied = svc.deny(pending.id, "bob", "purpose is outside the licence")
    assert denied.status == RequestStatus.DENIED and svc.grant_for_request(pending.id) is None
    with pytest.raises(AccessError, match="is denied; only pending requests"):
        svc.approve(pending.id, "carol")
    assert svc.audit(f"request:{pending.id}")[-1].details == {"reason": "purpose is outside the licence"}


def test_link_only_for_the_grants_requester(svc: AccessService) -> None:
    grant = _grant(svc)
    with pytest.raises(AccessDenied) as exc:
        svc.issue_link(grant.id, "mallory")
    assert exc.value.reason == "not the grant's requester"
    assert svc.audit(f"grant:{grant.id}")[-1].action == "link.refused"


def test_refused_after_link_expiry(svc: AccessService, clock: FakeClock) -> None:
    grant = _grant(svc)
    link = svc.issue_link(grant.id, "alice")
    clock.advance(seconds=3599)
    svc.authorize_download(link.token, MODEL, VERSION)
    clock.advance(seconds=1)
    assert _refused(svc, link.token) == "link expired"
    assert svc.authorize_download(svc.issue_link(grant.id, "alice").token, MODEL, VERSION).id == grant.id


def test_refused_after_grant_expiry(svc: AccessService, clock: FakeClock) -> None:
    grant = _grant(svc, days=1)
    clock.advance(hours=23, minutes=30)
    link = svc.issue_link(grant.id, "alice")
    assert link.expires_at == grant.expires_at  # a link never outlives its grant
    clock.advance(minutes=30)
    assert _refused(svc, link.token) == "grant expired"
    with pytest.raises(AccessDenied, match="grant expired; file a new access request"):
        svc.issue_link(grant.id, "alice")
    # an expired grant no longer blocks a new request for the same version
    again = _request(svc)
    assert svc.audit(f"request:{again.id}")[0].details["supersedes_request"] == grant.request_id


def test_revocation_stops_links_already_issued(svc: AccessService) -> None:
    grant = _grant(svc)
    link = svc.issue_link(grant.id, "alice")
    svc.authorize_download(link.token, MODEL, VERSION)
    revoked = svc.revoke(grant.id, "carol", "shared the weights publicly")
    assert revoked.revoked_by == "carol" and revoked.revoked_at is not None
    assert svc.get_request(grant.request_id).status == RequestStatus.REVOKED
    assert _refused(svc, link.token) == "grant revoked"
    with pytest.raises(AccessDenied, match="grant revoked"):
        svc.issue_link(grant.id, "alice")
    with pytest.raises(AccessError, match="already revoked by carol"):
        svc.revoke(grant.id, "carol", "twice")


def test_tampered_token_refused_and_recorded(svc: AccessService) -> None:
    grant = _grant(svc)
    token = svc.issue_link(grant.id, "alice").token
    body, sig = token.split(".")
    flip = {"A": "B"}
    tampered_body = body[:10] + flip.get(body[10], "A") + body[11:]
    tampered_sig = sig[:-1] + flip.get(sig[-1], "A")
    assert _refused(svc, f"{tampered_body}.{sig}") == "signature invalid"
    assert _refused(svc, f"{body}.{tampered_sig}") == "signature invalid"
    refused = [e for e in svc.download_events() if not e.ok]
    assert [(e.grant_id, e.detail) for e in refused] == [(None, "signature invalid")] * 2  # an unverified grant id is not trusted
    entry = svc.audit("link")[-1]
    assert (entry.action, entry.details["claimed_grant"]) == ("download.refused", grant.id)


def test_token_from_another_secret_refused(svc: AccessService, tmp_path: Path, clock: FakeClock) -> None:
    grant = _grant(svc)
    other = AccessService(f"sqlite:///{tmp_path}/db/access.db", b"o" * 32, clock=clock)  # same database, other key
    forged = other.issue_link(grant.id, "alice").token
    other.close()
    assert _refused(svc, forged) == "signature invalid"


def test_wrong_version_scope_refused(svc: AccessService) -> None:
    grant = _grant(svc)
    token = svc.issue_link(grant.id, "alice").token
    with pytest.raises(AccessDenied, match="link is for a different model version; it covers opt-175b version 3, not opt-175b version 4"):
        svc.authorize_download(token, MODEL, "4")
    assert svc.authorize_download(token, MODEL, VERSION).id == grant.id  # still good for the version it covers
    with pytest.raises(AccessDenied, match="different model version"):
        svc.authorize_download(token, "opt-66b", VERSION)


def test_quota_exhausted_after_n_downloads(svc: AccessService) -> None:
    grant = _grant(svc, quota=2)
    link = svc.issue_link(grant.id, "alice")
    for _ in range(2):
        svc.authorize_download(link.token, MODEL, VERSION)
        svc.record_download(grant.id, files=2, size_bytes=10)
    assert _refused(svc, link.token) == "quota exhausted"
    with pytest.raises(AccessDenied, match="all 2 downloads of grant 1 are used"):
        svc.issue_link(grant.id, "alice")


def test_reviewer_cannot_decide_own_request(svc: AccessService) -> None:
    req = _request(svc)
    for decide in (lambda: svc.approve(req.id, "alice"), lambda: svc.deny(req.id, " alice ", "no")):
        with pytest.raises(AccessDenied) as exc:
            decide()
        assert exc.value.reason == "reviewer is the requester"
    assert svc.get_request(req.id).status == RequestStatus.PENDING


def test_duplicate_request_refused(svc: AccessService) -> None:
    first = _request(svc)
    with pytest.raises(AccessError, match=f"alice already has request {first.id} for opt-175b version 3 pending review"):
        _request(svc)
    svc.approve(first.id, "bob")
    with pytest.raises(AccessError, match="approved .*ask for a download link instead"):
        _request(svc)
    _request(svc, version="4")  # another version, another request
    _request(svc, requester="dora")  # another researcher
    denied = _request(svc, requester="erin")
    svc.deny(denied.id, "bob", "no affiliation given")
    _request(svc, requester="erin")  # a denied request may be filed again


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("email", "not-an-email", "does not look like an email address"),
        ("email", "a@b", "does not look like an email address"),
        ("purpose", "research", "purpose is 8 characters: describe the intended research use in at least 20"),
        ("affiliation", "   ", "affiliation is required"),
        ("model_version", "", "model_version is required"),
    ],
)
def test_invalid_request_fields(svc: AccessService, field: str, value: str, message: str) -> None:
    fields = {
        "requester": "alice",
        "email": "alice@uni.edu",
        "affiliation": "Uni",
        "purpose": PURPOSE,
        "model_name": MODEL,
        "model_version": VERSION,
    }
    with pytest.raises(AccessError, match=message):
        svc.request_access(**{**fields, field: value})
    assert svc.list_requests() == [] and svc.audit() == []


def test_audit_log_is_append_only(svc: AccessService) -> None:
    grant = _grant(svc)
    link = svc.issue_link(grant.id, "alice")
    svc.authorize_download(link.token, MODEL, VERSION)
    _refused(svc, link.token, version="9")
    svc.record_download(grant.id, files=1, size_bytes=1)
    svc.revoke(grant.id, "carol", "end of project")
    actions = [e.action for e in svc.audit()]
    expected = ["request.created", "request.approved", "link.issued", "download.authorized", "download.refused", "download.completed"]
    assert actions == [*expected, "grant.revoked"]
    assert all(e.at.tzinfo is not None for e in svc.audit())

    sessions = svc._sessions
    with sessions() as s:
        entry = s.get(AuditEntry, 1)
        assert entry is not None
        entry.actor = "mallory"
        with pytest.raises(AppendOnlyViolation, match="append-only"):
            s.commit()
    with sessions() as s:
        s.delete(s.get(AuditEntry, 2))
        with pytest.raises(AppendOnlyViolation, match="append-only"):
            s.commit()
    for statement in (update(AuditEntry).values(actor="mallory"), delete(AuditEntry), delete(Base.metadata.tables["audit_log"])):
        with sessions() as s, pytest.raises(AppendOnlyViolation):
            s.execute(statement)
    assert [(e.actor, e.action) for e in svc.audit()][:2] == [("alice", "request.created"), ("bob", "request.approved")]


def test_from_config_creates_secret_0600_and_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    env = f"OPT_TEST_ACCESS_SECRET_{uuid.uuid4().hex}"
    monkeypatch.delenv(env, raising=False)
    home = tmp_path / "home" / ".opt"
    cfg = AccessConfig(db_url=f"sqlite:///{tmp_path}/a/access.db", link_ttl_seconds=60, grant_days=2, download_quota=1, secret_env=env)

    first = AccessService.from_config(cfg, home, clock=clock)
    secret_file = home / "access.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and len(secret_file.read_bytes()) == 32
    assert [p.name for p in home.iterdir()] == ["access.secret"]
    grant = first.approve(_request(first).id, "bob")
    assert (grant.download_quota, grant.expires_at) == (1, clock.now + timedelta(days=2))
    token = first.issue_link(grant.id, "alice").token
    first.close()

    second = AccessService.from_config(cfg, home, clock=clock)  # same file, same key: old links still verify
    assert second.authorize_download(token, MODEL, VERSION).id == grant.id
    second.close()

    monkeypatch.setenv(env, "an environment secret of enough length")
    from_env = AccessService.from_config(cfg, home, clock=clock)  # the environment wins over the file
    assert _refused(from_env, token) == "signature invalid"
    from_env.close()

    monkeypatch.setenv(env, "short")
    with pytest.raises(AccessError, match="needs 16 or more"):
        AccessService.from_config(cfg, home, clock=clock)
    monkeypatch.delenv(env)
    os.chmod(secret_file, 0o644)
    with pytest.raises(AccessError, match="chmod 600"):
        AccessService.from_config(cfg, home, clock=clock)


def test_bad_inputs_to_the_service(tmp_path: Path) -> None:
    with pytest.raises(AccessError, match="at least 16 bytes"):
        AccessService(f"sqlite:///{tmp_path}/x.db", b"short")
    with pytest.raises(AccessError, match="not a usable SQLAlchemy URL"):
        AccessService("nonsense://", SECRET)
    svc = AccessService(f"sqlite:///{tmp_path}/x.db", SECRET, clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="naive datetime"):
        _request(svc)
    with pytest.raises(AccessError, match="unknown request status"):
        svc.list_requests("approvedd")
    svc.close()


def test_schema_compiles_for_postgresql() -> None:
    # no PostgreSQL server in unit tests: at least prove the DDL is portable
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    ddl = "\n".join(str(CreateTable(t).compile(dialect=dialect)) for t in Base.metadata.sorted_tables)
    ddl += "\n".join(str(CreateIndex(i).compile(dialect=dialect)) for t in Base.metadata.sorted_tables for i in t.indexes)
    assert "TIMESTAMP WITH TIME ZONE" in ddl and "BIGINT" in ddl and "UNIQUE (open_key)" in ddl


def test_workflow_on_postgresql(clock: FakeClock, postgres_url: str) -> None:
    svc = AccessService(postgres_url, SECRET, clock=clock)
    requester = f"alice-{uuid.uuid4().hex[:8]}"  # the database outlives the test
    grant = _grant(svc, requester=requester)
    link = svc.issue_link(grant.id, requester)
    assert svc.authorize_download(link.token, MODEL, VERSION).expires_at == clock.now + timedelta(days=30)
    svc.record_download(grant.id, files=1, size_bytes=350 * 10**9)
    svc.revoke(grant.id, "carol", "test")
    assert _refused(svc, link.token) == "grant revoked"
    assert [e.action for e in svc.audit(f"grant:{grant.id}")][-1] == "download.refused"
    svc.close()
