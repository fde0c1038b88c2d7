"""Where a gated release's files live, and how one file leaves: a presigned S3 redirect or a local stream with Range.

A release root (`access.release_root`) is a local folder (made 0700: only the service's user can enter it) or an
`s3://bucket/prefix` that only the service's credentials can read. A release of `model` version `v` sits under
`<root>/<model>/<v>/`. The manifest (`manifest_text`) is the exact text the service signs: model, version, the
licence's sha256 and each file's path, size and sha256; a file is served only under a path that the signed
manifest lists, so no path from a caller ever reaches the filesystem or S3.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from opt import storage
from opt.access.errors import AccessError
from opt.access.keys import private_dir

CHUNK = 1 << 20
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class ReleaseFile:
    path: str
    size: int
    sha256: str


def check_release_path(path: str) -> str:
    """A manifest path: relative, POSIX, no '..', no empty or hidden parts; AccessError otherwise."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise AccessError(f"release file path {path!r} must be relative, without '..' or empty parts")
    return p.as_posix()


def manifest_text(model: str, version: str, files: list[ReleaseFile], licence_sha256: str) -> str:
    """The canonical manifest: the exact bytes that are signed, stored and handed to downloaders."""
    body = {
        "format": "opt-release/1",
        "model": model,
        "version": version,
        "licence_sha256": licence_sha256,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in sorted(files, key=lambda f: f.path)],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def manifest_files(text: str) -> dict[str, ReleaseFile]:
    return {f["path"]: ReleaseFile(f["path"], int(f["size"]), f["sha256"]) for f in json.loads(text)["files"]}


class ReleaseStore:
    """The release root: publishing files into it and handing them out."""

    def __init__(self, root: str, s3_client: Any = None) -> None:
        self.root = root.rstrip("/") if storage.is_s3(root) else str(Path(root).expanduser().resolve())
        self._s3 = s3_client
        if not storage.is_s3(self.root):
            private_dir(Path(self.root))

    @property
    def is_s3(self) -> bool:
        return storage.is_s3(self.root)

    def location(self, model: str, version: str) -> str:
        return storage.join(self.root, model, version)

    def publish(self, model: str, version: str, source: str, paths: list[str]) -> tuple[str, list[ReleaseFile]]:
        """Copy `paths` from `source` (a local folder or an s3:// prefix) into the release's folder, hashing each file
        as it streams through; returns the release's location and the files as they landed."""
        location = self.location(model, version)
        out: list[ReleaseFile] = []
        for rel in paths:
            rel = check_release_path(rel)
            with _open_source(storage.join(source, rel), self._client) as src:
                reader = _HashingReader(src)
                if self.is_s3:
                    bucket, key = storage.split_s3(storage.join(location, rel))
                    self._client().upload_fileobj(reader, bucket, key)
                else:
                    dst = Path(location) / rel
                    private_dir(dst.parent)
                    storage.put_stream(reader, str(dst))
            out.append(ReleaseFile(rel, reader.size, reader.hexdigest()))
        return location, out

    def local_file(self, location: str, path: str) -> Path:
        return Path(location) / check_release_path(path)

    def presigned_url(self, location: str, path: str, expires_s: int) -> str:
        bucket, key = storage.split_s3(storage.join(location, check_release_path(path)))
        url: str = self._client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)
        return url

    def _client(self) -> Any:
        return self._s3 if self._s3 is not None else storage.s3_client()


class _HashingReader(io.RawIOBase):
    """A readable stream that hashes and counts what passes through it."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self._h = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk = self._src.read(n)
        self._h.update(chunk)
        self.size += len(chunk)
        return chunk

    def readinto(self, b: Any) -> int:
        chunk = self.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@contextlib.contextmanager
def _open_source(uri: str, client: Any) -> Iterator[BinaryIO]:
    try:
        if storage.is_s3(uri):
            bucket, key = storage.split_s3(uri)
            body = client().get_object(Bucket=bucket, Key=key)["Body"]
            try:
                yield body
            finally:
                body.close()
        else:
            with open(uri, "rb") as f:
                yield f
    except (OSError, storage.StorageError) as e:
        raise AccessError(f"cannot read {uri} to publish it: {e}") from None
    except Exception as e:  # botocore's ClientError and friends: one line, not a traceback
        if type(e).__module__.startswith(("botocore", "boto3")):
            raise AccessError(f"cannot read {uri} to publish it: {e}") from None
        raise


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (start, end inclusive) of a single `Range: bytes=...` header; None for the whole file.

    Raises AccessError("range not satisfiable") for a range outside the file; several ranges are not supported
    (the downloader never asks for them) and are answered with the whole file, as RFC 9110 allows.
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            raise AccessError("range not satisfiable")
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise AccessError("range not satisfiable")
    return start, end


def read_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    """The bytes start..end (inclusive) of `path`, in chunks."""
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk
