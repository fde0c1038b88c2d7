"""The run lease and its compare-and-swap writes on a real S3-compatible server (SeaweedFS).

moto accepts conditional PUTs too, but whether two writers racing on one key can both win is a property of the
server, so it is checked against a real one (tests/conftest.py: `seaweed_s3`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from opt import storage
from opt.train.lease import LeaseHeld, acquire


@pytest.fixture
def s3_run(seaweed_s3, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("OPT_S3_ENDPOINT_URL", seaweed_s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    # boto3's default session caches the credentials it first resolved (moto's, from earlier tests): a fresh one
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    storage._s3_client.cache_clear()
    bucket = f"lease-{time.time_ns()}"
    seaweed_s3.client().create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/runs/r"
    storage._s3_client.cache_clear()


def test_compare_and_swap_on_s3(s3_run: str) -> None:
    uri = storage.join(s3_run, "x.json")
    assert storage.write_if_unchanged(uri, b"a", None)
    assert not storage.write_if_unchanged(uri, b"b", None)
    assert not storage.write_if_unchanged(uri, b"b", b"stale")
    assert storage.write_if_unchanged(uri, b"b", b"a") and storage.read_bytes(uri) == b"b"
    assert not storage.write_if_unchanged(uri, None, b"a")
    assert storage.write_if_unchanged(uri, None, b"b") and not storage.exists(uri)


def test_concurrent_creates_on_s3_have_one_winner(s3_run: str) -> None:
    uri = storage.join(s3_run, "race.json")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage.write_if_unchanged(uri, f"{i}".encode(), None), range(8)))
    assert sum(won) == 1 and storage.read_text(uri) == str(won.index(True))


def test_lease_refusal_and_takeover_on_s3(s3_run: str) -> None:
    dead = acquire(s3_run, ttl_s=30, now=time.time() - 31)
    new = acquire(s3_run, ttl_s=30)
    assert new.taken_over is not None and not dead.renew()
    with pytest.raises(LeaseHeld, match="being trained by"):
        acquire(s3_run)
    new.release()
    acquire(s3_run).release()
