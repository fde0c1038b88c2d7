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
    root = tmp_path_factory.mktemp("s3-access")
    home = root / "home"
    cfg = AccessConfig(
        home=str(home), db_url=f"sqlite:///{home / 'access.db'}", release_root="s3://opt-releases/gated", link_ttl_seconds=60
    )
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
