"""Releases: publishing a gated version's files with their signed manifest, the registry's gate verdict on it, and
reading it back. Publication runs on the operators' side (in-process, or over HTTP by an admin from under the
staging root only); any signed-in account may read a release's licence, manifest and signature."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from opt.access.auth import Principal
from opt.access.db import MODEL_LEN, Release
from opt.access.errors import AccessError, Conflict, NotFound
from opt.access.names import clean_text
from opt.access.release import manifest_files, manifest_text
from opt.access.web_sessions import WebSessions

MAX_REASON_CHARS = 5000


class Releases(WebSessions):
    def publish_release(
        self, model: str, version: str, source: str | Path, paths: list[str], licence: str,
        expected: dict[str, str] | None = None, by: str = "operator", gate_passed: bool = True, gate_reasons: list[str] | None = None,
    ) -> Release:  # fmt: skip
        """Copy a gated version's files from `source` (a local folder or an s3:// prefix the service can read) into
        the release root and record their manifest, signed. `expected` (path -> sha256, from the registry's download
        manifest) must match what was copied. Publishing a published version again with the same files returns it
        as it is; other files are refused, and a published release's files are never overwritten."""
        try:
            model, version = clean_text(model, "model", MODEL_LEN), clean_text(version, "version", 64)
            licence = clean_text(licence, "licence", 100_000, multiline=True)
        except AccessError as e:
            self._refuse(by, "release.publish", "release", e)
        subject = f"release:{model}:{version}"[:64]
        licence_sha = hashlib.sha256(licence.encode("utf-8")).hexdigest()
        with self._sessions() as s:
            existing = s.scalars(select(Release).where(Release.model_name == model, Release.model_version == version)).one_or_none()
        if existing is not None:
            have = {f.path: f.sha256 for f in manifest_files(existing.manifest).values()}
            if sorted(have) == sorted(paths) and (expected is None or expected == have) and existing.licence_sha256 == licence_sha:
                return existing
            self._refuse(by, "release.publish", subject, Conflict(f"{model} version {version} is already published with other files; "
                                                                  "register a new version instead"))  # fmt: skip
        try:
            location, files = self.releases.publish(model, version, str(source), paths)
        except AccessError as e:
            self._refuse(by, "release.publish", subject, e)
        changed = [f.path for f in files if expected is not None and expected.get(f.path) != f.sha256]
        if changed or (expected is not None and sorted(expected) != sorted(paths)):
            self._refuse(by, "release.publish", subject, AccessError(
                f"{', '.join(changed) or 'the file list'} differs from the registry's download manifest: the staged files changed "
                "after registration; register again"))  # fmt: skip
        text = manifest_text(model, version, files, licence_sha)
        try:
            with self._sessions.begin() as s:
                release = Release(
                model_name=model, model_version=version, location=location, manifest=text, signature=self.keys.sign(text.encode("utf-8")),
                    key_id=self.keys.key_id, licence=licence, licence_sha256=licence_sha, published_at=self._now(),
                    gate="passed" if gate_passed else "failed", gate_reasons=json.dumps(gate_reasons or []),
                )  # fmt: skip
                s.add(release)
                s.flush()
                detail = {"model": model, "version": version, "files": len(files), "gate": release.gate}
                self._audit(s, by, "release.published", f"release:{release.id}", detail)
        except IntegrityError:  # published at the same moment by another call: that one stands
            self._refuse(by, "release.publish", subject, Conflict(f"{model} version {version} was published meanwhile"))
        return release

    def override_gate(self, model: str, version: str, reason: str, by: str = "operator") -> Release:
        """Let a release that failed its gates be requested after all: a maintainer promoted it with --override."""
        reason = self._text(by, "release.override", "release", reason, "reason", MAX_REASON_CHARS, multiline=True)
        with self._sessions.begin() as s:
            rel = s.scalars(select(Release).where(Release.model_name == model, Release.model_version == version)).one_or_none()
            if rel is not None:
                before = rel.gate
                rel.gate = "overridden"
                self._audit(s, by, "release.gate_overridden", f"release:{rel.id}", {"reason": reason, "was": before})
        if rel is None:
            self._refuse(by, "release.override", f"release:{model}:{version}"[:64], NotFound(f"no gated release {model} version {version}"))
        return rel

    def override_as(self, actor: Principal, model: str, version: str, reason: str) -> Release:
        self._need_admin(actor, "release.override", f"release:{model}:{version}"[:64])
        return self.override_gate(model, version, reason, by=actor.name)

    def publish_as(self, actor: Principal, model: str, version: str, source: str, paths: list[str], licence: str,
                   expected: dict[str, str], gate_passed: bool = True, gate_reasons: list[str] | None = None) -> Release:  # fmt: skip
        """Publish over the API: admins only (the registering operator's account), from under the staging root only,
        so no caller can make the service read its own keys or any other file."""
        subject = f"release:{model}:{version}"[:64]
        self._need_admin(actor, "release.publish", subject)
        if not self.staging_root:
            self._refuse(
                actor, "release.publish", subject, AccessError("this service takes no publications over HTTP: set access.staging_uri")
            )
        if not _under(source, self.staging_root):
            self._refuse(actor, "release.publish", subject, AccessError(f"the source must lie under the staging root {self.staging_root}"))
        return self.publish_release(model, version, source, paths, licence, expected, actor.name, gate_passed, gate_reasons)

    def list_releases(self, actor: Principal) -> list[Release]:
        """Published releases that may be requested (their gates passed or were overridden), newest first."""
        with self._sessions() as s:
            return list(s.scalars(select(Release).where(Release.gate != "failed").order_by(Release.published_at.desc(), Release.id.desc())))

    def release(self, actor: Principal, model: str, version: str) -> Release:
        """A published release (its licence, manifest and signature); any signed-in account may read it."""
        with self._sessions() as s:
            rel = s.scalars(select(Release).where(Release.model_name == model, Release.model_version == version)).one_or_none()
        if rel is None:
            self._refuse(actor, "release.read", f"release:{model}:{version}"[:64], NotFound(f"no gated release {model} version {version}"))
        return rel


def _under(source: str, root: str) -> bool:
    """True if `source` names `root` or a place below it (local paths resolved first, so '..' and links cannot escape)."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in source) or any(0xD800 <= ord(ch) <= 0xDFFF for ch in source):
        return False  # a NUL or control byte, or a lone surrogate, names no file (and would crash the path code)
    if root.startswith("s3://") or source.startswith("s3://"):
        return source.rstrip("/").startswith(root.rstrip("/") + "/") and ".." not in source.split("/")
    base, path = Path(root).resolve(), Path(source).resolve()
    return path == base or base in path.parents
