"""What researchers and reviewers run: the access service's HTTP client and the verifying downloader.

It holds nothing but the service's URL and the caller's personal token: no database, no key, no MLflow or store
credentials. A download checks the release's manifest against the Ed25519 signature the service made at
publication (with a public key pinned by `$OPT_ACCESS_PUBLIC_KEY` or `--public-key`, else the one the service
serves), then fetches the files in parallel, each verified by sha256 while it streams, resumed from its `.part`
file after a dropped connection, and moved to its final name only once it matched. Any mismatch stops the
download, names the file, and leaves nothing under a final name that was not verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opt import storage
from opt.access.errors import TamperedRelease
from opt.access.keys import key_id, verify_signature
from opt.access.release import check_release_path
from opt.errors import OptError

RELEASE_RECORD = ".opt-release.json"
CHUNK = 1 << 20
RETRIES = 3


class ServiceRefused(OptError):
    """The service refused a call (or could not be reached); the message is its one-line reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Fetched:
    path: str
    size: int
    sha256: str
    resumed_from: int
    skipped: bool


class AccessClient:
    """The service's API as the token's user. `transport` is for tests (httpx's ASGI transport)."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 60.0, transport: Any = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, transport=transport)
        # file links go to S3 or to the service's own link endpoint: they carry their own credential, never the token
        self._plain = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False)

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, json=body, params={k: v for k, v in (params or {}).items() if v is not None})
        except httpx.HTTPError as e:
            raise ServiceRefused(0, f"cannot reach the access service at {self.url}: {e}; is `optctl access serve` running?") from None
        if r.status_code >= 400:
            try:
                detail = str(r.json().get("detail", r.text))
            except ValueError:
                detail = r.text[:200] or r.reason_phrase
            raise ServiceRefused(r.status_code, detail)
        return r.json() if r.content else None

    # --- downloads -------------------------------------------------------------------------------------

    def download(self, model: str, version: str, out_dir: Path, public_key: str | None = None, workers: int = 4,
                 progress: bool = True) -> list[Fetched]:  # fmt: skip
        """Download and verify every file of a release into `out_dir`; returns what was fetched (or already there)."""
        try:  # before any quota is taken
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / f".opt-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OptError(f"cannot write the download folder {out_dir}: {e.strerror or e}; choose another --out") from None
        dl = self.call("POST", "/v1/downloads", {"model": model, "version": version})
        rel = dl["release"]
        key = public_key or self.call("GET", "/v1/public-key")["public_key"]
        if rel["key_id"] != key_id(key) or not verify_signature(key, rel["manifest"].encode("utf-8"), rel["signature"]):
            raise TamperedRelease(
                f"{model} version {version}: the manifest's signature does not verify with key {key_id(key)}; nothing was downloaded"
            )
        manifest = json.loads(rel["manifest"])
        if (manifest["model"], manifest["version"]) != (model, version):
            raise TamperedRelease(
                f"the signed manifest is for {manifest['model']} version {manifest['version']}, not {model} version {version}"
            )
        files = manifest["files"]
        bar = _progress(sum(f["size"] for f in files), f"{model} v{version}", progress)
        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                fetched = list(pool.map(lambda f: self._fetch(dl["id"], f, out_dir, bar), files))
        finally:
            bar.close()
        record = {"manifest": rel["manifest"], "signature": rel["signature"], "public_key": key, "key_id": rel["key_id"]}
        (out_dir / RELEASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        self.call("POST", f"/v1/downloads/{dl['id']}/complete")
        return fetched

    def _fetch(self, download_id: int, f: dict[str, Any], out_dir: Path, bar: Any) -> Fetched:
        path, size, digest = check_release_path(f["path"]), int(f["size"]), f["sha256"]
        final = (out_dir / path).resolve()
        if out_dir.resolve() not in final.parents:
            raise TamperedRelease(f"{path}: the manifest names a file outside the download folder")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_file() and final.stat().st_size == size and storage.sha256_file(final) == digest:
            bar.update(size)
            return Fetched(path, size, digest, size, skipped=True)
        part = final.with_name(final.name + ".part")
        started = part.stat().st_size if part.exists() else 0
        got = ""
        for attempt in range(RETRIES + 1):
            try:
                got = self._stream(download_id, path, size, part, bar)
                break
            except _Dropped as e:
                if attempt == RETRIES:
                    raise ServiceRefused(
                        0, f"{path}: the connection dropped {RETRIES + 1} times ({e}); run the download again to resume"
                    ) from None
        if part.stat().st_size != size or got != digest:
            part.unlink()
            raise TamperedRelease(
                f"{path}: its sha256 differs from the signed manifest (the file was replaced in the release store); nothing kept"
            )
        os.replace(part, final)
        return Fetched(path, size, digest, started, skipped=False)

    def _stream(self, download_id: int, path: str, size: int, part: Path, bar: Any) -> str:
        """Fetch the rest of `path` into `part`; returns the sha256 of the whole part, hashed as it streamed."""
        import httpx

        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            part.unlink()
            offset = 0
        h = _sha256_of(part, offset)
        bar.update(offset)
        if offset == size:
            return h.hexdigest()
        try:
            r = self._http.get(f"/v1/downloads/{download_id}/files/{path}")
        except httpx.HTTPError as e:
            raise _Dropped(str(e)) from None
        if r.status_code != 303:
            detail = r.json().get("detail", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
            raise ServiceRefused(r.status_code, f"{path}: {detail}")
        location = httpx.URL(self.url).join(r.headers["location"])
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with self._plain.stream("GET", location, headers=headers) as resp:
                if resp.status_code == 200 and offset:  # the range was not honoured: start over
                    bar.update(-offset)
                    offset, h = 0, hashlib.sha256()
                elif resp.status_code not in (200, 206):
                    resp.read()
                    raise ServiceRefused(resp.status_code, f"{path}: {_detail(resp)}")
                with open(part, "r+b" if offset else "wb") as out:
                    out.seek(offset)
                    out.truncate()
                    for chunk in resp.iter_bytes(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        except httpx.HTTPError as e:
            raise _Dropped(str(e)) from None
        return h.hexdigest()


class _Dropped(Exception):
    pass


def _detail(resp: Any) -> str:
    try:
        return str(resp.json().get("detail"))
    except ValueError:
        return resp.text[:200] or resp.reason_phrase  # S3 answers XML: its first line is enough


def _sha256_of(path: Path, n: int) -> Any:
    """A sha256 hasher fed the first `n` bytes of `path` (a partial file being resumed; nothing if it is absent)."""
    h = hashlib.sha256()
    if n == 0 or not path.exists():
        return h
    with open(path, "rb") as f:
        left = n
        while left > 0 and (chunk := f.read(min(CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
    return h


class _Bar:
    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress(total: int, desc: str, enabled: bool) -> _Bar:
    if not enabled or not sys.stderr.isatty():
        return _Bar(None)
    from tqdm import tqdm

    return _Bar(tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr))
