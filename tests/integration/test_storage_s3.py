"""opt.storage against S3 over real HTTP.

No S3 is reachable from here, so moto's server mode stands in for it: boto3 talks to it through the
same endpoint override (`OPT_S3_ENDPOINT_URL`) that MinIO or any S3-compatible store would use.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from opt import storage
from opt.storage import StorageError

BUCKET = "opt-test"


@pytest.fixture
def bucket(s3_buckets) -> str:
    """A fresh, empty bucket on the session's S3 endpoint (tests/conftest.py); yields its `s3://` URI."""
    return s3_buckets(BUCKET)


def test_write_then_read_returns_the_same_bytes_and_hashlib_sha256(bucket: str) -> None:
    uri = storage.join(bucket, "runs", "r1", "blob.bin")
    data = os.urandom(5000)

    info = storage.write_bytes(uri, data)

    assert storage.read_bytes(uri) == data
    assert (info.uri, info.size, info.sha256) == (uri, len(data), hashlib.sha256(data).hexdigest())


def test_writes_record_the_sha256_as_object_metadata(bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"uploaded file")
    storage.write_bytes(f"{bucket}/a", b"written bytes")
    storage.put_file(src, f"{bucket}/b")

    client = storage.s3_client()
    assert client.head_object(Bucket=BUCKET, Key="a")["Metadata"]["sha256"] == hashlib.sha256(b"written bytes").hexdigest()
    assert client.head_object(Bucket=BUCKET, Key="b")["Metadata"]["sha256"] == hashlib.sha256(b"uploaded file").hexdigest()


def test_write_replaces_an_existing_object(bucket: str) -> None:
    uri = f"{bucket}/obj"
    storage.write_bytes(uri, b"old")
    storage.write_text(uri, "new")
    assert storage.read_text(uri) == "new"
    assert storage.stat(uri).sha256 == hashlib.sha256(b"new").hexdigest()


def test_put_file_and_get_file_copy_bytes(bucket: str, tmp_path: Path) -> None:
    data = os.urandom(storage.CHUNK + 777)
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    info = storage.put_file(src, f"{bucket}/ckpt/model.safetensors")
    out = storage.get_file(info.uri, tmp_path / "download" / "model.safetensors")

    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]  # no temp file left behind


def test_list_files_returns_sorted_uris_under_a_prefix_only(bucket: str) -> None:
    for key in ("runs/r1/b", "runs/r1/a", "runs/r1/sub/c", "runs/r10/x", "top"):
        storage.write_bytes(f"{bucket}/{key}", b".")

    # `runs/r1` is a directory-like prefix: `runs/r10/x` is not under it.
    assert storage.list_files(f"{bucket}/runs/r1") == [f"{bucket}/runs/r1/a", f"{bucket}/runs/r1/b", f"{bucket}/runs/r1/sub/c"]
    assert storage.list_files(f"{bucket}/runs/r1/") == storage.list_files(f"{bucket}/runs/r1")
    assert len(storage.list_files(bucket)) == 5
    assert storage.list_files(f"{bucket}/nothing") == []


def test_exists_and_delete_of_objects_and_prefixes(bucket: str) -> None:
    storage.write_bytes(f"{bucket}/one", b"1")
    storage.write_bytes(f"{bucket}/tree/x", b"x")
    storage.write_bytes(f"{bucket}/tree/sub/y", b"y")
    storage.write_bytes(f"{bucket}/tree-sibling", b"z")

    assert storage.exists(f"{bucket}/one")
    assert not storage.exists(f"{bucket}/missing")
    storage.delete(f"{bucket}/one")
    assert not storage.exists(f"{bucket}/one")
    storage.delete(f"{bucket}/tree")  # everything under the prefix goes
    assert storage.list_files(bucket) == [f"{bucket}/tree-sibling"]
    storage.delete(f"{bucket}/never-existed")  # missing targets are fine


def test_stat_reports_size_and_the_recorded_sha256(bucket: str) -> None:
    uri = f"{bucket}/obj"
    written = storage.write_bytes(uri, b"hello world")
    assert storage.stat(uri) == written


def test_stat_computes_the_sha256_when_no_metadata_was_recorded(bucket: str) -> None:
    # Objects uploaded by other tools carry no sha256 metadata.
    storage.s3_client().put_object(Bucket=BUCKET, Key="foreign", Body=b"from elsewhere")
    info = storage.stat(f"{bucket}/foreign")
    assert (info.size, info.sha256) == (14, hashlib.sha256(b"from elsewhere").hexdigest())


def test_missing_objects_raise_storage_error_naming_the_uri(bucket: str, tmp_path: Path) -> None:
    uri = f"{bucket}/missing"
    with pytest.raises(StorageError, match=uri):
        storage.read_bytes(uri)
    with pytest.raises(StorageError, match=uri):
        storage.stat(uri)
    with pytest.raises(StorageError, match=uri):
        storage.get_file(uri, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # the failed download left no temp file


def test_a_uri_without_a_bucket_is_rejected() -> None:
    with pytest.raises(StorageError, match="bucket"):
        storage.read_bytes("s3:///key")


APPENDER = """
import sys
from opt.logbook import Logbook

book = Logbook(sys.argv[1])
for i in range(int(sys.argv[3])):
    book.append("tick", writer=sys.argv[2], i=i)
"""


def test_the_logbook_keeps_every_line_when_processes_append_at_once(bucket: str) -> None:
    """The driver, Ray Train's controller and rank 0 append to one run's logbook at the same moments; S3
    cannot append, so a shared object rewritten by each would lose lines."""
    import subprocess
    import sys

    from opt.logbook import Logbook

    run = storage.join(bucket, "runs", "r1")
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, run, f"w{n}", "15"], env=os.environ.copy(), stderr=subprocess.PIPE)
        for n in range(3)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:] if p.stderr else ""
    events = Logbook(run).read()
    assert len(events) == 45
    for n in range(3):
        assert [e["i"] for e in events if e["writer"] == f"w{n}"] == list(range(15))  # each writer's order kept
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)


def test_the_logbook_reads_one_written_before_per_writer_objects(bucket: str) -> None:
    """A run whose logbook.jsonl was written whole (before per-writer objects) keeps its events, in time order."""
    import json

    from opt.logbook import LOGBOOK_FILE, Logbook

    run = storage.join(bucket, "runs", "old")
    old = [{"ts": "2026-01-01T00:00:00Z", "t": 1.0, "event": "run_started", "host": "h"}]
    storage.write_text(storage.join(run, LOGBOOK_FILE), "".join(json.dumps(e) + "\n" for e in old))
    book = Logbook(run)
    book.append("note", text="after the upgrade")
    assert [e["event"] for e in book.read()] == ["run_started", "note"]
    book.append("note", text="and again")  # this process's object grows; a reader sees the new size
    assert [e.get("text") for e in book.read()] == [None, "after the upgrade", "and again"]
