"""Publishing a gated release: in-process beside the keys (embedded defaults), or over HTTP by an admin from
under the service's staging root (production: the keys never leave the service)."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from opt.config import RunConfig
from tests.access_world import World


def _stage(world: World, name: str, files: dict[str, bytes]) -> tuple[Path, list[dict]]:
    src = world.root / "staging" / name
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src, [{"path": rel, "sha256": hashlib.sha256(data).hexdigest()} for rel, data in files.items()]


def test_an_admin_publishes_from_the_staging_root_and_nobody_else_can(world: World):
    admin, alice = world.person("admin"), world.person()
    version = secrets.token_hex(3)
    src, files = _stage(world, f"m/{version}", {"hf/model.safetensors": secrets.token_bytes(5000), "hf/config.json": b"{}"})
    body = {"model": "opt-pub", "version": version, "source": str(src), "files": files, "licence": "Research only."}
    r = alice.http.post("/v1/releases", json=body)
    assert r.status_code == 403 and "not an admin" in r.json()["detail"]
    r = admin.http.post("/v1/releases", json=body)
    assert r.status_code == 201, r.text
    assert json.loads(r.json()["manifest"])["files"] == sorted(({"size": len(b"{}") if f["path"].endswith(".json") else 5000, **f}
                                                                for f in files), key=lambda f: f["path"])  # fmt: skip
    assert admin.http.post("/v1/releases", json=body).status_code == 201  # the same files again: the same release
    other = dict(body, files=[dict(files[0], sha256="0" * 64), files[1]])
    r = admin.http.post("/v1/releases", json=other)
    assert r.status_code == 409 and "already published" in r.json()["detail"]
    assert world.refused(alice.name, "release.publish") and world.refused(admin.name, "release.publish")


def test_publication_reads_nothing_outside_the_staging_root(world: World):
    admin = world.person("admin")
    home = world.root / "home"
    # a NUL byte (found by the fuzzer: it crashed the path code with a 500) is refused the same way
    staged = str(world.root / "staging" / "x")
    for source in (str(home), str(world.root / "staging" / ".." / "home"), "/etc", staged + "\x00", staged + "\x1b[2J"):
        body = {"model": "opt-evil", "version": "1", "source": source, "files": [{"path": "signing.key", "sha256": "0" * 64}],
                "licence": "x"}  # fmt: skip
        # sent as JSON text with \u escapes, as the fuzzer did (a lone surrogate cannot be encoded as UTF-8)
        r = admin.http.post("/v1/releases", content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "must lie under the staging root" in r.json()["detail"], source
    assert admin.http.get("/v1/releases/opt-evil/1").status_code == 404


def test_staged_files_that_changed_after_registration_are_refused(world: World):
    admin = world.person("admin")
    version = secrets.token_hex(3)
    src, files = _stage(world, f"m/{version}", {"w.bin": b"registered bytes"})
    (src / "w.bin").write_bytes(b"swapped in the staging area")
    r = admin.http.post("/v1/releases", json={"model": "opt-pub", "version": version, "source": str(src), "files": files, "licence": "x"})
    assert r.status_code == 422 and "w.bin differs from the registry's download manifest" in r.json()["detail"]
    assert admin.http.get(f"/v1/releases/opt-pub/{version}").status_code == 404


def test_registration_publishes_through_the_service(world: World, tmp_path: Path, monkeypatch):
    from opt.registry.mlflow_registry import DOWNLOAD_MANIFEST, publish_gated

    admin, alice, bob = world.person("admin"), world.person(), world.person("reviewer")
    export = tmp_path / "export"
    data = {"consolidated/model.safetensors": secrets.token_bytes(10_000), "README.md": b"# card"}
    for rel, blob in data.items():
        (export / rel).parent.mkdir(parents=True, exist_ok=True)
        (export / rel).write_bytes(blob)
    manifest = [{"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in data.items()]
    (export / DOWNLOAD_MANIFEST).write_text(json.dumps({"files": manifest}))
    version = secrets.token_hex(3)
    access = {"url": world.srv.url, "publish_via": "service", "staging_uri": str(world.root / "staging")}
    cfg = RunConfig.model_validate({"registry": {"model_name": "opt-reg", "access_class": "gated"}, "access": access})
    monkeypatch.setenv("OPT_ACCESS_TOKEN", admin.token)
    publish_gated(cfg, version, export)
    assert not export.exists() and not list((world.root / "staging" / "opt-reg" / version).rglob("*.*"))  # no copy left behind
    req = world.request(alice, "opt-reg", version)
    bob.http.post(f"/v1/requests/{req['id']}/approve", json={})
    got = alice.client.download("opt-reg", version, tmp_path / "dl", progress=False)
    assert {f.path for f in got} == set(data) and (tmp_path / "dl" / "README.md").read_bytes() == b"# card"


def test_a_version_that_failed_its_gates_cannot_be_requested_until_overridden(world: World):
    admin, alice = world.person("admin"), world.person()
    version = secrets.token_hex(3)
    src, files = _stage(world, f"m/{version}", {"w.bin": b"weights"})
    body = {"model": "opt-failed", "version": version, "source": str(src), "files": files, "licence": "x",
            "gate_passed": False, "gate_reasons": ["regression:pydocs_choice.acc 0.40 < champion v3's 0.55 - 2 x stderr 0.05"]}  # fmt: skip
    assert admin.http.post("/v1/releases", json=body).json()["gate"] == "failed"
    rel = alice.http.get(f"/v1/releases/opt-failed/{version}").json()
    req = {"model": "opt-failed", "version": version, "affiliation": "Uni", "organisation_kind": "academic",
           "purpose": "A research purpose that is long enough", "accept_licence_sha256": rel["licence_sha256"]}  # fmt: skip
    r = alice.http.post("/v1/requests", json=req)
    assert r.status_code == 403 and "version failed its gates" in r.json()["detail"] and "champion v3" in r.json()["detail"]
    assert world.refused(alice.name, "request.create")[-1]["detail"]["reason"] == "version failed its gates"
    assert alice.http.post(f"/v1/releases/opt-failed/{version}/override", json={"reason": "mine"}).status_code == 403
    r = admin.http.post(f"/v1/releases/opt-failed/{version}/override", json={"reason": "promoted with --override by the board"})
    assert r.status_code == 200 and r.json()["gate"] == "overridden"
    assert alice.http.post("/v1/requests", json=req).status_code == 201
