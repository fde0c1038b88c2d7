"""One URI layer over local paths and `s3://bucket/key` (boto3).

Every write is atomic: a reader sees the old object or the new one, never a half-written one.
Locally a write goes to a hidden temporary file in the same directory, is fsynced, then renamed over
the target; on S3 an object appears only when its PUT (or multipart upload) completes. Writes return
an `ObjectInfo` with the sha256 of what was written; on S3 it is also stored as object metadata.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

from opt.errors import OptError

TMP_PREFIX = ".tmp-"  # in-flight local writes; never listed, never read
CHUNK = 1 << 20


class StorageError(OptError, OSError):
    """A storage operation failed; the message names the URI."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    sha256: str


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # 2+ letters: `C:` is a drive, not a scheme


def is_uri(location: str) -> bool:
    """True for `scheme:...` locations (s3://, http://, mlflow-artifacts:/), False for local paths."""
    return bool(_SCHEME.match(location))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI path segments with `/` (works for local paths and s3:// URIs)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI; StorageError when it names no bucket."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket: s3://bucket/key")
    return bucket, key


@cache
def _s3_client(endpoint_url: str | None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url)


def s3_client() -> Any:
    """The boto3 S3 client; `OPT_S3_ENDPOINT_URL` (or boto3's own `AWS_ENDPOINT_URL`) selects the endpoint."""
    return _s3_client(os.environ.get("OPT_S3_ENDPOINT_URL") or None)


# --- local ---------------------------------------------------------------------------------------


def _local_atomic_write(path: Path, fill: Any) -> ObjectInfo:
    """Write through `fill(fileobj, hasher)` to a temp file beside `path`, fsync, rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f, h)
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # fsync the directory so the rename itself survives a power loss
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return ObjectInfo(str(path), size, h.hexdigest())


def _copy_stream(src: BinaryIO, dst: BinaryIO, h: Any) -> None:
    while chunk := src.read(CHUNK):
        h.update(chunk)
        dst.write(chunk)


# --- public API ----------------------------------------------------------------------------------


def write_bytes(uri: str, data: bytes) -> ObjectInfo:
    """Atomically write `data` to `uri`."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        digest = hashlib.sha256(data).hexdigest()
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": digest})
        except Exception as e:
            raise StorageError(f"{uri}: write failed: {e}") from e
        return ObjectInfo(uri, len(data), digest)

    def fill(f: BinaryIO, h: Any) -> None:
        h.update(data)
        f.write(data)

    return _local_atomic_write(Path(uri), fill)


def write_text(uri: str, text: str) -> ObjectInfo:
    return write_bytes(uri, text.encode("utf-8"))


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:
            raise StorageError(f"{uri}: read failed: {e}") from e
    try:
        return Path(uri).read_bytes()
    except OSError as e:
        raise StorageError(f"{uri}: read failed: {e.strerror or e}") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def put_file(local_path: str | Path, uri: str) -> ObjectInfo:
    """Atomically copy a local file to `uri`."""
    if is_s3(uri):
        digest = sha256_file(local_path)
        size = os.path.getsize(local_path)
        bucket, key = split_s3(uri)
        try:
            s3_client().upload_file(str(local_path), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
        except Exception as e:
            raise StorageError(f"{uri}: upload of {local_path} failed: {e}") from e
        return ObjectInfo(uri, size, digest)
    # Hash while copying: the source is read once (it may be a pipe), and the digest is of what landed.
    with open(local_path, "rb") as src:
        return _local_atomic_write(Path(uri), lambda f, h: _copy_stream(src, f, h))


def put_stream(src: Any, uri: str) -> ObjectInfo:
    """Atomically write everything the readable binary stream `src` yields to `uri` (a local path), hashing it."""
    return _local_atomic_write(Path(uri), lambda f, h: _copy_stream(src, f, h))


def get_file(uri: str, local_path: str | Path) -> Path:
    """Copy `uri` to a local file (atomically) and return its path."""
    dst = Path(local_path)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dst.parent)
        os.close(fd)
        try:
            s3_client().download_file(bucket, key, tmp)
            os.replace(tmp, dst)
        except Exception as e:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"{uri}: download failed: {e}") from e
        return dst
    try:
        with open(uri, "rb") as src:
            _local_atomic_write(dst, lambda f, h: _copy_stream(src, f, h))
    except OSError as e:
        raise StorageError(f"{uri}: copy to {dst} failed: {e.strerror or e}") from e
    return dst


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"{uri}: exists check failed: {e}") from e
    return Path(uri).exists()


def list_files(prefix_uri: str) -> list[str]:
    """URIs of all objects under `prefix_uri` (recursively), sorted; in-flight writes excluded."""
    if is_s3(prefix_uri):
        return list(list_sizes(prefix_uri))
    root = Path(prefix_uri)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith(TMP_PREFIX))


def list_sizes(prefix_uri: str) -> dict[str, int]:
    """`list_files` with each object's size in bytes (one listing, no reads)."""
    if is_s3(prefix_uri):
        bucket, key = split_s3(prefix_uri)
        key = key.rstrip("/") + "/" if key else ""
        out: dict[str, int] = {}
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out.update((f"s3://{bucket}/{obj['Key']}", obj["Size"]) for obj in page.get("Contents", []))
        return dict(sorted(out.items()))
    return {uri: Path(uri).stat().st_size for uri in list_files(prefix_uri)}


def delete(uri: str) -> None:
    """Delete one object, or everything under a directory/prefix. Missing targets are fine."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        keys = [key] + [u[len(f"s3://{bucket}/") :] for u in list_files(uri)]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
        return
    p = Path(uri)
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def stat(uri: str) -> ObjectInfo:
    """Size and sha256 of an object (from S3 metadata when recorded, else computed)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise StorageError(f"{uri}: stat failed: {e}") from e
        digest = head.get("Metadata", {}).get("sha256") or hashlib.sha256(read_bytes(uri)).hexdigest()
        return ObjectInfo(uri, head["ContentLength"], digest)
    p = Path(uri)
    if not p.is_file():
        raise StorageError(f"{uri}: no such file")
    return ObjectInfo(uri, p.stat().st_size, sha256_file(p))


def local_path(uri: str, cache_dir: str | Path) -> Path:
    """A local path holding `uri`: the path itself when local, else a download into `cache_dir`."""
    if not is_s3(uri):
        return Path(uri)
    bucket, key = split_s3(uri)
    dst = Path(cache_dir) / bucket / key
    if not dst.exists():
        get_file(uri, dst)
    return dst


def write_if_unchanged(uri: str, data: bytes | None, expected: bytes | None) -> bool:
    """Compare-and-swap: write `data` (None: delete) only if the object now holds exactly `expected` (None: absent).

    True when written. Locally the check and the write happen under an exclusive lock on a hidden file beside the
    object; on S3 they are one conditional request (`If-None-Match: *` to create, `If-Match: <etag>` to replace or
    delete), so two writers racing on the same object cannot both succeed.
    """
    if is_s3(uri):
        return _s3_write_if_unchanged(uri, data, expected)
    import fcntl

    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{TMP_PREFIX}{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = path.read_bytes() if path.exists() else None
        except OSError as e:
            raise StorageError(f"{uri}: read failed: {e.strerror or e}") from e
        if current != expected:
            return False
        if data is None:
            path.unlink(missing_ok=True)
        else:
            write_bytes(uri, data)
        return True


def _s3_write_if_unchanged(uri: str, data: bytes | None, expected: bytes | None) -> bool:
    bucket, key = split_s3(uri)
    client = s3_client()

    def code(e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    try:
        if expected is None:
            if data is None:
                return not exists(uri)
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        try:
            got = client.get_object(Bucket=bucket, Key=key)
        except Exception as e:
            if code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        if got["Body"].read() != expected:
            return False
        if data is None:
            client.delete_object(Bucket=bucket, Key=key, IfMatch=got["ETag"])
        else:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=got["ETag"])
        return True
    except Exception as e:
        if code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return False
        raise StorageError(f"{uri}: conditional write failed: {e}") from e
