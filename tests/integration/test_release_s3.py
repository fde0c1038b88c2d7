"""Gated releases on S3, against SeaweedFS (a real S3-compatible server that enforces presigned signatures and
expiry; moto does not, so it would prove nothing here). Only the service's credentials read the release bucket;
a researcher gets one object at a time, through a presigned URL that expires in minutes."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest

from opt.access.auth import Principal
from opt.access.db import Role
from opt.access.server import build_service, running
from opt.config import AccessConfig
from tests.access_world import World

FILES = {"hf/model.safetensors": secrets.token_bytes(2_500_000), "hf/config.json": b'{"n_layer": 2}'}


@pytest.fixture(scope="module")
def s3_world(seaweed_s3, tmp_path_factory):
    client = seaweed_s3.client()
    client.create_bucket(Bucket="opt-releases")
    client.create_bucket(Bucket="opt-staging")
    root = tmp_path_factory.mktemp("s3-access")
    home = root / "home"
    db = f"sqlite:///{home / 'access.db'}"
    cfg = AccessConfig(home=str(home), db_url=db, release_root="s3://opt-releases/gated", staging_uri="s3://opt-staging/gated",
                       link_ttl_seconds=60)  # fmt: skip
    service = build_service(cfg, s3_client=client)
    with running(service) as srv:
        yield World(srv, root)
    service.close()


def test_a_release_on_s3_downloads_through_presigned_urls_and_verifies(s3_world: World, seaweed_s3, tmp_path: Path):
    alice, bob = s3_world.person(), s3_world.person("reviewer")
    model, version, _ = s3_world.granted(alice, bob, files=FILES)
    keys = {o["Key"] for o in seaweed_s3.client().list_objects_v2(Bucket="opt-releases")["Contents"]}
    assert keys >= {f"gated/{model}/{version}/{p}" for p in FILES}
    got = alice.client.download(model, version, tmp_path, progress=False)
    assert {f.path for f in got} == set(FILES)
    assert all((tmp_path / p).read_bytes() == data for p, data in FILES.items())
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
    location = alice.http.get(f"/v1/downloads/{dl['id']}/files/hf/config.json").headers["location"]
    assert location.startswith(seaweed_s3.endpoint + "/opt-releases/gated/") and "X-Amz-Signature=" in location
    assert "X-Amz-Expires=60" in location  # the server's link lifetime, not the caller's


def test_the_release_bucket_refuses_everything_but_a_valid_presigned_url(s3_world: World, seaweed_s3):
    alice, bob = s3_world.person(), s3_world.person("reviewer")
    model, version, grant = s3_world.granted(alice, bob, files=FILES)
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
    url = alice.http.get(f"/v1/downloads/{dl['id']}/files/hf/config.json").headers["location"]
    plain = httpx.Client(timeout=30)
    assert plain.get(url).content == FILES["hf/config.json"]
    assert plain.get(f"{seaweed_s3.endpoint}/opt-releases/gated/{model}/{version}/hf/config.json").status_code == 403  # anonymous
    assert plain.get(url.replace("hf/config.json", "hf/model.safetensors")).status_code == 403  # key swapped
    sig = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    assert plain.get(url[:sig] + ("0" if url[sig] != "0" else "1") + url[sig + 1 :]).status_code == 403  # altered
    short = seaweed_s3.client().generate_presigned_url(
        "get_object", Params={"Bucket": "opt-releases", "Key": f"gated/{model}/{version}/hf/config.json"}, ExpiresIn=1
    )
    time.sleep(2.1)
    assert plain.get(short).status_code == 403  # expired
    # revocation: the next file is refused by the service (a URL already handed out lives at most link_ttl_seconds)
    assert bob.http.post(f"/v1/grants/{grant['id']}/revoke", json={"reason": "breach"}).status_code == 200
    r = alice.http.get(f"/v1/downloads/{dl['id']}/files/hf/model.safetensors")
    assert r.status_code == 403 and "grant revoked" in r.json()["detail"]


def test_a_replaced_object_is_refused_as_tampered(s3_world: World, seaweed_s3, tmp_path: Path):
    from opt.access.errors import TamperedRelease

    alice, bob = s3_world.person(), s3_world.person("reviewer")
    model, version, _ = s3_world.granted(alice, bob, files=FILES)
    seaweed_s3.client().put_object(Bucket="opt-releases", Key=f"gated/{model}/{version}/hf/model.safetensors",
                                   Body=bytes(len(FILES["hf/model.safetensors"])))  # fmt: skip
    with pytest.raises(TamperedRelease, match="hf/model.safetensors: its sha256 differs from the signed manifest"):
        alice.client.download(model, version, tmp_path, progress=False)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    rel = s3_world.service.release(Principal(0, "operator", Role.ADMIN), model, version)
    assert rel.location == f"s3://opt-releases/gated/{model}/{version}"


def test_an_admin_publishes_from_s3_staging_through_the_service(s3_world: World, seaweed_s3, tmp_path: Path):
    import hashlib

    admin, alice, bob = s3_world.person("admin"), s3_world.person(), s3_world.person("reviewer")
    client = seaweed_s3.client()
    version = secrets.token_hex(3)
    for rel, data in FILES.items():
        client.put_object(Bucket="opt-staging", Key=f"gated/opt-s3/{version}/{rel}", Body=data)
    files = [{"path": rel, "sha256": hashlib.sha256(data).hexdigest()} for rel, data in FILES.items()]
    body = {"model": "opt-s3", "version": version, "source": f"s3://opt-staging/gated/opt-s3/{version}", "files": files, "licence": "x"}
    assert admin.http.post("/v1/releases", json=dict(body, source="s3://opt-releases/gated")).status_code == 422  # not staging
    r = admin.http.post("/v1/releases", json=body)
    assert r.status_code == 201, r.text
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="opt-releases", Prefix=f"gated/opt-s3/{version}/")["Contents"]}
    assert keys == {f"gated/opt-s3/{version}/{rel}" for rel in FILES}
    req = s3_world.request(alice, "opt-s3", version)
    bob.http.post(f"/v1/requests/{req['id']}/approve", json={})
    alice.client.download("opt-s3", version, tmp_path, progress=False)
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == FILES["hf/model.safetensors"]
