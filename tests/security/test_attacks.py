"""The attack suite: each attempt against the running access service over HTTP is refused, changes nothing, and
is audited with the actor, the object and the reason."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import text, update

from opt.access import links
from opt.access.db import ApiToken, Grant
from tests.access_world import World

pytestmark = pytest.mark.security


def _grant(world: World, grant_id: int) -> Grant:
    with world.service._sessions() as s:
        g = s.get(Grant, grant_id)
        assert g is not None
        return g


def _detail(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"detail"} and "\n" not in body["detail"] and "Traceback" not in body["detail"], body
    return body["detail"]


# --- credentials -------------------------------------------------------------------------------------


def test_no_credentials_or_a_bad_token_is_401_and_audited(world: World):
    before = len(world.audit(action="auth.refused"))
    anon = world.anonymous()
    for headers in (
        {},
        {"Authorization": "Bearer opt_" + "A" * 43},
        {"Authorization": "Basic YWxpY2U6cGFzcw=="},
        {"Authorization": "x" * 5000},
    ):
        r = anon.get("/v1/requests", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "token" in _detail(r)
    assert anon.get("/v1/public-key").status_code == 200  # what anyone may read
    assert len(world.audit(action="auth.refused")) == before + 4


def test_expired_and_revoked_tokens_stop_working(world: World):
    alice = world.person()
    assert alice.http.get("/v1/me").json()["name"] == alice.name
    second = alice.http.post("/v1/tokens", json={"label": "laptop"}).json()
    laptop = httpx.Client(base_url=world.srv.url, headers={"Authorization": f"Bearer {second['token']}"})
    assert laptop.get("/v1/me").status_code == 200
    assert alice.http.delete(f"/v1/tokens/{second['id']}").status_code == 200
    assert laptop.get("/v1/me").status_code == 401
    with world.service._sessions.begin() as s:  # the first token's expiry passes
        s.execute(update(ApiToken).where(ApiToken.user_id == alice.http.get("/v1/me").json()["id"]).values(expires_at=datetime.now(UTC)))
    assert alice.http.get("/v1/me").status_code == 401
    assert [t for t in world.audit(action="token.revoked") if t["subject"] == f"token:{second['id']}"]


def test_another_users_token_cannot_be_revoked(world: World):
    alice, erin = world.person(), world.person()
    erin_tokens = erin.http.get("/v1/tokens").json()
    r = alice.http.delete(f"/v1/tokens/{erin_tokens[0]['id']}")
    assert r.status_code == 404
    assert erin.http.get("/v1/me").status_code == 200
    assert world.refused(alice.name, "token.revoke")


def test_token_guessing_is_rate_limited(world: World):
    from opt.access.auth import FailureLimiter

    app = world.srv.app
    shared, app.state.limiter = app.state.limiter, FailureLimiter(max_failures=5, window_s=60)
    try:
        good = world.person()
        anon = world.anonymous()
        codes = [anon.get("/v1/me", headers={"Authorization": f"Bearer opt_{i:043d}"}).status_code for i in range(8)]
        assert codes == [401] * 5 + [429] * 3
        r = good.http.get("/v1/me")  # from the same address, even a good token waits out the window
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "too many failed" in _detail(r)
    finally:
        app.state.limiter = shared


# --- roles and ownership -----------------------------------------------------------------------------


def test_a_researcher_cannot_review(world: World):
    alice, mallory = world.person(), world.person()
    model, version, _ = world.release()
    req = world.request(alice, model, version)
    for path, body in ((f"/v1/requests/{req['id']}/approve", {}), (f"/v1/requests/{req['id']}/deny", {"reason": "no"})):
        r = mallory.http.post(path, json=body)
        assert r.status_code == 403 and "not a reviewer" in _detail(r)
    assert alice.http.get(f"/v1/requests/{req['id']}").json()["status"] == "pending"
    assert len(world.refused(mallory.name, "request.approve")) == 1 and len(world.refused(mallory.name, "request.deny")) == 1


def test_nobody_reviews_their_own_request(world: World):
    bob = world.person("reviewer")
    model, version, _ = world.release()
    req = world.request(bob, model, version)
    r = bob.http.post(f"/v1/requests/{req['id']}/approve", json={})
    assert r.status_code == 403 and "reviewer is the requester" in _detail(r)
    assert bob.http.get(f"/v1/requests/{req['id']}").json()["status"] == "pending"
    assert world.refused(bob.name, "request.approve")[-1]["detail"]["reason"] == "reviewer is the requester"


def test_a_researcher_sees_only_their_own_requests_grants_and_audit(world: World):
    alice, erin, bob = world.person(), world.person(), world.person("reviewer")
    model, version, grant = world.granted(alice, bob)
    r = erin.http.get(f"/v1/requests/{grant['request_id']}")
    assert r.status_code == 404 and "visible to you" in _detail(r)
    assert erin.http.get("/v1/requests").json() == [] and erin.http.get("/v1/grants").json() == []
    r = erin.http.get("/v1/audit", params={"actor": alice.name})
    assert r.status_code == 403
    assert {e["actor"] for e in erin.http.get("/v1/audit").json()} <= {erin.name}
    mine = alice.http.get("/v1/requests").json()
    assert [m["id"] for m in mine] == [grant["request_id"]] and mine[0]["email"] == f"{alice.name}@uni.edu"
    assert world.refused(erin.name, "request.read") and world.refused(erin.name, "audit.read")
    # nor can erin revoke alice's grant or use her download
    assert erin.http.post(f"/v1/grants/{grant['id']}/revoke", json={"reason": "x"}).status_code == 403
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
    assert erin.http.get(f"/v1/downloads/{dl['id']}/files/hf/config.json").status_code == 404
    assert erin.http.post(f"/v1/downloads/{dl['id']}/complete").status_code == 404
    assert world.refused(erin.name, "file.get") and world.refused(erin.name, "download.complete")


def test_a_grant_covers_its_own_release_only(world: World):
    alice, bob = world.person(), world.person("reviewer")
    model, version, grant = world.granted(alice, bob)
    other_model, other_version, _ = world.release(model="opt-other")
    for m, v in ((model, str(int(version) + 1000)), (other_model, other_version)):
        r = alice.http.post("/v1/downloads", json={"model": m, "version": v})
        assert r.status_code in (403, 404)
    other_files = json.loads(world.service.release(_admin(), other_model, other_version).manifest)["files"]
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
    # a path of another release through this download: not a file of this one
    r = alice.http.get(f"/v1/downloads/{dl['id']}/files/{other_files[0]['path']}x")
    assert r.status_code == 404
    assert _grant(world, grant["id"]).downloads_used == 1


def test_mass_assignment_is_refused(world: World):
    alice, admin = world.person(), world.person("admin")
    model, version, _ = world.release()
    rel = alice.http.get(f"/v1/releases/{model}/{version}").json()
    body = {"model": model, "version": version, "affiliation": "Uni", "organisation_kind": "academic",
            "purpose": "A research purpose that is long enough", "accept_licence_sha256": rel["licence_sha256"]}  # fmt: skip
    for extra in ({"status": "approved"}, {"user_id": 1}, {"requester": admin.name}):
        r = alice.http.post("/v1/requests", json={**body, **extra})
        assert r.status_code == 422 and "extra" in _detail(r).lower()
    assert alice.http.get("/v1/requests").json() == []
    r = alice.http.post("/v1/users", json={"name": "eve", "email": "eve@x.org", "role": "admin"})
    assert r.status_code == 403 and world.refused(alice.name, "user.create")
    req = world.request(alice, model, version)
    r = admin.http.post(f"/v1/requests/{req['id']}/approve", json={"quota": 2, "downloads_used": -5})
    assert r.status_code == 422 and alice.http.get(f"/v1/requests/{req['id']}").json()["status"] == "pending"


# --- downloads ---------------------------------------------------------------------------------------


def _admin():  # type: ignore[no-untyped-def]
    from opt.access.auth import Principal
    from opt.access.db import Role

    return Principal(0, "operator", Role.ADMIN)


def _link(person, download_id: int, path: str) -> str:  # type: ignore[no-untyped-def]
    r = person.http.get(f"/v1/downloads/{download_id}/files/{path}")
    assert r.status_code == 303, r.text
    return r.headers["location"]


def test_expired_altered_and_forged_links_are_refused(world: World):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.granted(alice, bob)
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
    good = _link(alice, dl["id"], "hf/config.json")
    anon = world.anonymous()
    assert anon.get(good).status_code == 200  # the link is its own credential, like a presigned URL
    token = good.rsplit("/", 1)[1]
    body, sig = token.split(".")
    altered = f"{body[:-2]}{'A' if body[-2] != 'A' else 'B'}{body[-1]}.{sig}"
    forged = links.sign(dl["id"], "hf/config.json", datetime.now(UTC) + timedelta(minutes=5), b"not-the-service-secret-0123456789")
    expired = links.sign(dl["id"], "hf/config.json", datetime.now(UTC) - timedelta(seconds=1), world.service.keys.secret)
    for bad, reason in ((altered, "link invalid"), (forged, "link invalid"), (expired, "link expired"), ("x" * 5000, "link invalid")):
        r = anon.get(f"/v1/files/{bad}")
        assert r.status_code == 403 and reason in _detail(r), bad[:40]
    assert len([e for e in world.audit(action="file.serve.refused") if e["detail"]["reason"] in ("link invalid", "link expired")]) >= 4


def test_revocation_stops_a_link_already_issued(world: World):
    alice, bob = world.person(), world.person("reviewer")
    model, version, grant = world.granted(alice, bob)
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
    link = _link(alice, dl["id"], "hf/model.safetensors")
    assert bob.http.post(f"/v1/grants/{grant['id']}/revoke", json={"reason": "licence breach"}).status_code == 200
    r = world.anonymous().get(link)
    assert r.status_code == 403 and "grant revoked" in _detail(r)
    r = alice.http.get(f"/v1/downloads/{dl['id']}/files/hf/config.json")
    assert r.status_code == 403 and "grant revoked" in _detail(r)
    assert world.refused(alice.name, "file.serve") and world.refused(alice.name, "file.get")


def test_quota_counts_whole_downloads_and_is_enforced(world: World, tmp_path):
    alice, bob = world.person(), world.person("reviewer")
    model, version, grant = world.granted(alice, bob, quota=1)
    alice.client.download(model, version, tmp_path / "a", progress=False)
    r = alice.http.post("/v1/downloads", json={"model": model, "version": version})
    assert r.status_code == 403 and "quota exhausted" in _detail(r)
    assert _grant(world, grant["id"]).downloads_used == 1
    assert world.refused(alice.name, "download.start")[-1]["detail"]["reason"] == "quota exhausted"


def test_parallel_downloads_never_exceed_the_quota(world: World):
    alice, bob = world.person(), world.person("reviewer")
    model, version, grant = world.granted(alice, bob, quota=3)
    for _ in range(2):  # quota - 1 left
        dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
        alice.http.post(f"/v1/downloads/{dl['id']}/complete")
    started: list[int] = []
    lock = threading.Lock()

    def go() -> None:
        with httpx.Client(base_url=world.srv.url, headers={"Authorization": f"Bearer {alice.token}"}, timeout=60) as c:
            r = c.post("/v1/downloads", json={"model": model, "version": version})
            if r.status_code == 201:
                c.post(f"/v1/downloads/{r.json()['id']}/complete")
                with lock:
                    started.append(r.json()["id"])

    threads = [threading.Thread(target=go) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(started)) == 1  # one whole download was left, and only one was had
    assert _grant(world, grant["id"]).downloads_used == 3


def test_a_download_that_skips_the_count_is_refused(world: World):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.granted(alice, bob)
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
    link = _link(alice, dl["id"], "hf/config.json")
    assert alice.http.post(f"/v1/downloads/{dl['id']}/complete").status_code == 200
    for r in (alice.http.get(f"/v1/downloads/{dl['id']}/files/hf/config.json"), world.anonymous().get(link)):
        assert r.status_code == 403 and "download completed" in _detail(r)
    assert alice.http.get("/v1/downloads/999999/files/hf/config.json").status_code == 404


@pytest.mark.parametrize("path", ["../../access.db", "..%2F..%2Faccess.db", "hf/../../signing.key", "/etc/passwd", "hf%00/config.json"])
def test_path_traversal_in_file_paths_is_refused(world: World, path: str):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.granted(alice, bob)
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
    r = alice.http.get(f"/v1/downloads/{dl['id']}/files/{path}")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    assert "signing" not in r.text and "root:" not in r.text


def test_the_release_store_refuses_paths_outside_the_release(world: World, tmp_path):
    from opt.access.errors import AccessError

    for bad in ("../x", "/abs", "a//b", "a/./b", "a\\b"):
        with pytest.raises(AccessError, match="must be relative"):
            world.service.publish_release("opt-evil", "1", tmp_path, [bad], "licence")


# --- input ---------------------------------------------------------------------------------------------


def test_sql_injection_is_only_ever_data(world: World):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.release()
    rel = alice.http.get(f"/v1/releases/{model}/{version}").json()
    evil = "Uni'); DROP TABLE users; --"
    body = {"model": model, "version": version, "affiliation": evil, "organisation_kind": "academic",
            "purpose": "x' OR '1'='1' -- a research purpose long enough", "accept_licence_sha256": rel["licence_sha256"]}  # fmt: skip
    req = alice.http.post("/v1/requests", json=body).json()
    assert req["affiliation"] == evil
    assert bob.http.get("/v1/requests", params={"status": "pending' OR '1'='1"}).status_code == 422
    assert world.anonymous().get(f"/v1/releases/{model}'--/{version}").status_code == 401
    assert alice.http.get(f"/v1/releases/{model}' OR '1'='1/{version}").status_code == 404
    with world.service._sessions() as s:
        assert s.execute(text("SELECT count(*) FROM users")).scalar_one() > 0


@pytest.mark.parametrize("bad", ["line\nforged line", "\x1b[31mred\x1b[0m", "zero\u200bwidth", "bidi\u202eevil", "nul\x00"])
def test_control_characters_in_text_fields_are_refused(world: World, bad: str):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.release()
    rel = alice.http.get(f"/v1/releases/{model}/{version}").json()
    body = {"model": model, "version": version, "affiliation": bad, "organisation_kind": "academic",
            "purpose": "A research purpose that is long enough", "accept_licence_sha256": rel["licence_sha256"]}  # fmt: skip
    r = alice.http.post("/v1/requests", json=body)
    assert r.status_code == 422 and "affiliation" in _detail(r)
    assert alice.http.get("/v1/requests").json() == []
    assert world.refused(alice.name, "request.create")
    r = alice.http.post("/v1/tokens", json={"label": bad})
    assert r.status_code == 422
    req = world.request(alice, model, version)
    if "\n" not in bad:  # a reason may span lines; escapes and invisible characters never
        r = bob.http.post(f"/v1/requests/{req['id']}/deny", json={"reason": bad})
        assert r.status_code == 422 and alice.http.get(f"/v1/requests/{req['id']}").json()["status"] == "pending"


def test_oversized_bodies_are_refused_before_they_are_read(world: World):
    alice = world.person()
    r = alice.http.post("/v1/tokens", content=b'{"label": "' + b"x" * 100_000 + b'"}', headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"label": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = alice.http.post("/v1/tokens", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert len(alice.http.get("/v1/tokens").json()) == 1
    refused = [e for e in world.audit(actor=alice.name) if e["action"] == "input.refused"]
    assert len(refused) == 2 and refused[0]["subject"] == "POST /v1/tokens" and "body over" in refused[0]["detail"]["reason"]


@pytest.mark.parametrize(
    "field, value", [("days", 1_000_000_000), ("quota", 10**20), ("quota", 0), ("days", -1), ("quota", 1e20), ("days", "9966")]
)
def test_numbers_out_of_range_get_one_line(world: World, field: str, value: object):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.release()
    req = world.request(alice, model, version)
    r = bob.http.post(f"/v1/requests/{req['id']}/approve", json={field: value})
    assert r.status_code == 422 and field in _detail(r)
    assert alice.http.get(f"/v1/requests/{req['id']}").json()["status"] == "pending"
    refused = [e for e in world.audit(actor=bob.name) if e["action"] in ("input.refused", "request.approve.refused")]
    assert len(refused) == 1 and field in json.dumps(refused[0]["detail"])


def test_the_server_bounds_what_a_reviewer_may_grant(world: World):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.release()
    req = world.request(alice, model, version)
    for body in ({"days": 91}, {"quota": 11}):  # the session's service allows 90 days, 10 downloads
        r = bob.http.post(f"/v1/requests/{req['id']}/approve", json=body)
        assert r.status_code == 422 and "the server's limit" in _detail(r)
    assert len(world.refused(bob.name, "request.approve")) == 2
    grant = bob.http.post(f"/v1/requests/{req['id']}/approve", json={"days": 90, "quota": 10}).json()
    assert grant["download_quota"] == 10


def test_look_alike_and_invisible_character_names_are_refused(world: World):
    from opt.access.errors import AccessError

    admin = world.person("admin")
    base = world.person().name
    for name in (base.upper(), base + "\u200b", "\uff4d" + base[1:] if base[0] == "m" else base.replace("r", "\u0433", 1),
                 base.replace("o", "0") if "o" in base else base + "\u00ad", " " + base):  # fmt: skip
        r = admin.http.post("/v1/users", json={"name": name, "email": "x@uni.edu", "role": "reviewer"})
        assert r.status_code in (409, 422), name
        with pytest.raises(AccessError):
            world.service.add_user(name, "x@uni.edu", "reviewer")
    r = admin.http.post("/v1/users", json={"name": "rn" + base, "email": "x@uni.edu", "role": "researcher"})
    r2 = admin.http.post("/v1/users", json={"name": "m" + base, "email": "x@uni.edu", "role": "researcher"})
    assert r.status_code == 201 and r2.status_code == 409 and "looks like" in _detail(r2)
    assert world.refused(admin.name, "user.create")


# --- integrity ---------------------------------------------------------------------------------------


def test_replaced_weights_and_manifest_in_the_store_are_refused(world: World, tmp_path):
    from opt.access.client import ServiceRefused
    from opt.access.errors import TamperedRelease

    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.granted(alice, bob)
    rel = world.service.release(_admin(), model, version)
    weights = world.service.releases.local_file(rel.location, "hf/model.safetensors")
    original = weights.read_bytes()
    weights.write_bytes(b"replaced" * 1000)  # another size: the service itself refuses to serve it
    with pytest.raises(ServiceRefused, match="hf/model.safetensors in the release store is not the file that was published"):
        alice.client.download(model, version, tmp_path / "a", progress=False)
    weights.write_bytes(bytes(len(original)))  # the same size, other bytes: the client's sha256 catches it
    with pytest.raises(TamperedRelease, match="hf/model.safetensors: its sha256 differs from the signed manifest"):
        alice.client.download(model, version, tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "hf" / "model.safetensors").exists() and not list((tmp_path / "a").rglob("*.part"))
    assert (tmp_path / "a" / "hf" / "config.json").is_file()  # the file that verified is kept
    # whoever can write the database as well replaces the manifest: its signature no longer verifies
    fake = json.loads(rel.manifest)
    zeros = hashlib.sha256(bytes(len(original))).hexdigest()
    fake["files"] = [dict(f, sha256=zeros) if f["path"] == "hf/model.safetensors" else f for f in fake["files"]]
    forged = json.dumps(fake, sort_keys=True, separators=(",", ":"))
    with world.service._sessions.begin() as s:
        s.execute(text("UPDATE releases SET manifest = :m WHERE id = :i"), {"m": forged, "i": rel.id})
    with pytest.raises(TamperedRelease, match="signature does not verify"):
        alice.client.download(model, version, tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "hf").exists()


def test_audit_tampering_through_the_services_own_session_is_detected(world: World):
    from opt.access.db import AppendOnlyViolation, AuditEntry

    reviewer = world.person("reviewer")
    assert reviewer.http.get("/v1/audit/verify").json()["ok"]
    with world.service._sessions.begin() as s, pytest.raises(AppendOnlyViolation):
        s.execute(update(AuditEntry).where(AuditEntry.id == 1).values(actor="nobody"))
    with world.service._sessions() as s:
        original = s.execute(text("SELECT detail FROM audit_log WHERE id = 3")).scalar_one()
    try:
        with world.service._sessions.begin() as s:
            s.execute(text('UPDATE audit_log SET detail = \'{"reason": "nothing to see"}\' WHERE id = 3'))
        r = reviewer.http.get("/v1/audit/verify").json()
        assert not r["ok"] and r["entry"] == 3 and "entry 3 was changed" in r["problem"]
    finally:  # the session's service is shared: put the entry back as it was
        with world.service._sessions.begin() as s:
            s.execute(text("UPDATE audit_log SET detail = :d WHERE id = 3"), {"d": original})
    assert reviewer.http.get("/v1/audit/verify").json()["ok"]
