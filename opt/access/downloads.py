"""Downloads: a whole download of a release under a grant (one unit of quota, resumable for free), and each of
its files, for which the grant is checked again, so a revocation stops the next file at once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from opt.access import links
from opt.access.auth import Principal
from opt.access.db import AccessRequest, Download, Grant, Release, RequestStatus, rowcount
from opt.access.errors import AccessDenied, AccessError, NotFound
from opt.access.release import ReleaseFile, manifest_files
from opt.access.releases import Releases


@dataclass(frozen=True)
class FileGrant:
    """Where one file of a download may be fetched: a presigned S3 URL, or the service's own short-lived link."""

    url: str | None
    token: str | None
    file: ReleaseFile


class Downloads(Releases):
    def start_download(self, actor: Principal, model: str, version: str) -> tuple[Download, Release]:
        """Start (or resume) a whole download of a release under the caller's grant; starting takes one unit of quota."""
        rel = self.release(actor, model, version)
        subject = f"release:{rel.id}"
        now = self._now()
        with self._sessions.begin() as s:
            grant = s.scalars(
                select(Grant).join(Grant.request)
                .where(AccessRequest.user_id == actor.user_id, AccessRequest.release_id == rel.id)
                .order_by(Grant.id.desc())
            ).first()  # fmt: skip
            reason = "no grant" if grant is None else grant.refusal_reason(now)
            if reason is None and grant is not None:
                open_dl = s.scalars(
                    select(Download).where(Download.grant_id == grant.id, Download.completed_at.is_(None), Download.expires_at > now)
                ).first()
                if open_dl is not None:
                    self._audit(s, actor.name, "download.resumed", f"download:{open_dl.id}", {"grant": grant.id})
                    return open_dl, rel
                taken = rowcount(
                    s.execute(
                        update(Grant)
                        .where(
                            Grant.id == grant.id,
                            Grant.downloads_used < Grant.download_quota,
                            Grant.revoked_at.is_(None),
                            Grant.expires_at > now,
                        )
                        .values(downloads_used=Grant.downloads_used + 1)
                    )
                )  # one statement: of many parallel starts at quota - 1, exactly one gets the last unit
                if taken == 1:
                    dl = Download(grant_id=grant.id, started_at=now, expires_at=now + timedelta(hours=self.limits.download_hours))
                    s.add(dl)
                    s.flush()
                    self._audit(
                        s, actor.name, "download.started", f"download:{dl.id}", {"grant": grant.id, "model": model, "version": version}
                    )
                    return dl, rel
                reason = "quota exhausted"
        if reason in ("no grant", "grant revoked", "grant expired") and self._has_pending_request(actor, rel.id):
            reason = "request pending"
        hints = {
            "request pending": "a reviewer has not decided your request yet (`optctl access list` shows it)",
            "no grant": f"you hold no approved grant for {model} version {version}; file a request (optctl access request)",
            "quota exhausted": f"every download of grant {grant.id if grant else ''} is used; file a new request",
            "grant revoked": "the grant was revoked; contact the reviewers",
            "grant expired": "the grant expired; file a new request",
        }
        why = reason or "no grant"
        self._refuse(actor, "download.start", subject, AccessDenied(why, hints.get(why, "")))

    def file_link(self, actor: Principal, download_id: int, path: str) -> FileGrant:
        """Where the caller may fetch one file of their open download: the grant is checked again, now."""
        subject = f"download:{download_id}"
        now = self._now()
        with self._sessions() as s:
            dl = s.get(Download, download_id)
        if dl is None or dl.grant.request.user_id != actor.user_id:
            self._refuse(actor, "file.get", subject, NotFound(f"no download {download_id} of yours"))
        reason = dl.grant.refusal_reason(now)
        if reason is None and dl.completed_at is not None:
            reason = "download completed"
        if reason is None and now >= dl.expires_at:
            reason = "download expired"
        if reason is not None:
            self._refuse(actor, "file.get", subject, AccessDenied(reason, "start the download again (optctl access download)"))
        rel = dl.grant.request.release
        file = manifest_files(rel.manifest).get(path)
        if file is None:
            self._refuse(actor, "file.get", subject, NotFound(f"{path!r} is not a file of {rel.model_name} version {rel.model_version}"))
        expires = now + timedelta(seconds=self.limits.link_ttl_seconds)
        with self._sessions.begin() as s:
            s.execute(update(Download).where(Download.id == download_id).values(files_served=Download.files_served + 1))
            self._audit(s, actor.name, "file.linked", subject, {"path": path, "expires_at": expires.isoformat()})
        if self.releases.is_s3:
            return FileGrant(self.releases.presigned_url(rel.location, path, self.limits.link_ttl_seconds), None, file)
        return FileGrant(None, links.sign(download_id, path, expires, self.keys.secret), file)

    def open_file_link(self, token: str) -> tuple[Path, ReleaseFile]:
        """The local file behind one of the service's file links, if the link is valid and its grant still holds."""
        now = self._now()
        try:
            link = links.verify(token, self.keys.secret, now)
        except AccessDenied as e:
            self._refuse("anonymous", "file.serve", "link", e)
        with self._sessions() as s:
            dl = s.get(Download, link.download)
        subject = f"download:{link.download}"
        owner = dl.grant.request.user.name if dl else "anonymous"
        reason = "download not found" if dl is None else dl.grant.refusal_reason(now) or ("download completed" if dl.completed_at else None)
        if reason is not None or dl is None:
            self._refuse(owner, "file.serve", subject, AccessDenied(reason or "download not found", "start the download again"))
        rel = dl.grant.request.release
        file = manifest_files(rel.manifest)[link.path]
        local = self.releases.local_file(rel.location, link.path)
        size = local.stat().st_size if local.is_file() else None
        if size != file.size:  # replaced or removed since publication: the sha256 the client checks would fail too
            self._refuse(owner, "file.serve", subject, AccessError(
                f"{link.path} in the release store is not the file that was published ({size} bytes, signed {file.size}); "
                "the release was altered: the operators must publish it again"))  # fmt: skip
        with self._sessions.begin() as s:
            self._audit(s, owner, "file.served", subject, {"path": link.path, "nonce": link.nonce})
        return local, file

    def complete_download(self, actor: Principal, download_id: int) -> Download:
        """Close a download once every file verified; a new download after this takes quota again."""
        subject = f"download:{download_id}"
        with self._sessions.begin() as s:
            dl = s.get(Download, download_id)
            mine = dl is not None and dl.grant.request.user_id == actor.user_id
            if mine and dl is not None and dl.completed_at is None:
                s.execute(update(Download).where(Download.id == download_id).values(completed_at=self._now()))
                self._audit(s, actor.name, "download.completed", subject, {"grant": dl.grant_id})
        if not mine:
            self._refuse(actor, "download.complete", subject, NotFound(f"no download {download_id} of yours"))
        with self._sessions() as s:
            out = s.get(Download, download_id)
            assert out is not None
            return out

    def _has_pending_request(self, actor: Principal, release_id: int) -> bool:
        mine = (
            AccessRequest.user_id == actor.user_id,
            AccessRequest.release_id == release_id,
            AccessRequest.status == RequestStatus.PENDING,
        )
        with self._sessions() as s:
            return s.scalars(select(AccessRequest.id).where(*mine)).first() is not None
