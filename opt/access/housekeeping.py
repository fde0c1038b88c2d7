"""Daily access housekeeping (the `opt-access-housekeeping` deployment, or `optctl access housekeeping`).

- Grants past their expiry are recorded as expired (`grant.expired`, once each): a grant already stops working at
  its expiry; this puts the moment in the audit trail, where reviewers and auditors read it.
- Requests pending longer than the reminder age are listed for the reviewers (`request.reminder` each time).
- The audit chain is verified (`audit.verified`); a broken chain makes the housekeeping fail, so the scheduled run
  shows red in the Prefect UI with the entry where the chain breaks.
All of it is audited under the actor `housekeeping`, which is no account: nobody can sign in as it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from opt.access import audit
from opt.access.db import AccessRequest, AuditEntry, Grant, RequestStatus

ACTOR = "housekeeping"


@dataclass
class HousekeepingReport:
    at: str
    expired: list[dict[str, Any]] = field(default_factory=list)
    """Grants recorded as expired by this run: id, requester, model, version, expired at."""
    waiting: list[dict[str, Any]] = field(default_factory=list)
    """Requests pending longer than the reminder age, oldest first: id, requester, model, version, hours waiting."""
    chain_ok: bool = True
    chain_entries: int = 0
    chain_problem: str | None = None
    mailed: int = 0
    """Reviewers sent the digest (or the reminder of requests waiting too long)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        """The report as a Prefect artifact shows it."""
        lines = [f"# Access housekeeping, {self.at}", ""]
        chain = f"intact ({self.chain_entries} entries)" if self.chain_ok else f"**BROKEN**: {self.chain_problem}"
        lines += [f"- audit chain: {chain}", f"- grants expired since the last run: {len(self.expired)}",
                  f"- requests waiting for a reviewer too long: {len(self.waiting)}", ""]  # fmt: skip
        if self.waiting:
            lines += ["| request | requester | model | waiting |", "|---|---|---|---|"]
            lines += [f"| {w['id']} | {w['requester']} | {w['model']} v{w['version']} | {w['hours']:.0f} h |" for w in self.waiting]
        if self.expired:
            lines += ["", "| grant | requester | model | expired |", "|---|---|---|---|"]
            lines += [f"| {g['id']} | {g['requester']} | {g['model']} v{g['version']} | {g['expired_at']} |" for g in self.expired]
        return "\n".join(lines) + "\n"


def run_housekeeping(service: Any, remind_after_hours: float) -> HousekeepingReport:
    """One housekeeping pass over `service` (an AccessService) at its clock's now."""
    now = service._now()
    report = HousekeepingReport(at=now.isoformat(timespec="seconds"))
    with service._sessions.begin() as s:
        recorded = set(s.scalars(select(AuditEntry.subject).where(AuditEntry.action == "grant.expired")))
        for g in s.scalars(select(Grant).where(Grant.revoked_at.is_(None)).order_by(Grant.id)):
            expires = _aware(g.expires_at, now.tzinfo)
            if expires > now or f"grant:{g.id}" in recorded:
                continue
            rel, who = g.request.release, g.request.user.name
            row = {"id": g.id, "requester": who, "model": rel.model_name, "version": rel.model_version,
                   "expired_at": expires.isoformat(timespec="seconds"), "downloads_used": g.downloads_used}  # fmt: skip
            service._audit(s, ACTOR, "grant.expired", f"grant:{g.id}", row)
            report.expired.append(row)
        cutoff = now - timedelta(hours=remind_after_hours)
        pending = s.scalars(select(AccessRequest).where(AccessRequest.status == RequestStatus.PENDING).order_by(AccessRequest.id))
        for r in pending:
            created = _aware(r.created_at, now.tzinfo)
            if created > cutoff:
                continue
            row = {"id": r.id, "requester": r.user.name, "model": r.release.model_name, "version": r.release.model_version,
                   "hours": (now - created).total_seconds() / 3600}  # fmt: skip
            service._audit(s, ACTOR, "request.reminder", f"request:{r.id}", {**row, "hours": round(row["hours"], 1)})
            report.waiting.append(row)
        report.mailed = _mail_reviewers(service, s, now, {w["id"] for w in report.waiting})
    with service._sessions() as s:
        chain = audit.verify(s, service.keys.secret)
    report.chain_ok, report.chain_entries, report.chain_problem = chain.ok, chain.entries, chain.problem
    with service._sessions.begin() as s:
        service._audit(s, ACTOR, "audit.verified", "audit", {"ok": chain.ok, "entries": chain.entries, "problem": chain.problem})
    return report


def _aware(at: datetime, tz: Any) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=tz)


def _mail_reviewers(service: Any, s: Any, now: datetime, overdue: set[int]) -> int:
    """The digest of every pending request (`access.mail.reviewers: digest`), else a reminder of the overdue ones."""
    digest = service.mail_settings is not None and service.mail_settings.reviewers == "digest"
    pending = s.scalars(select(AccessRequest).where(AccessRequest.status == RequestStatus.PENDING).order_by(AccessRequest.id))
    listed = [r for r in pending if digest or r.id in overdue]
    if not listed:
        return 0
    lines = [f"- request {r.id}: {r.user.name} for {r.release.model_name} v{r.release.model_version}, waiting "
             f"{(now - _aware(r.created_at, now.tzinfo)).total_seconds() / 3600:.0f} h" for r in listed]  # fmt: skip
    title = "requests waiting for a review" if digest else "requests waiting too long"
    body = "\n".join(lines) + f"\n\nThe queue: {service.portal_link('/review')}\n"
    reviewers = service._reviewer_emails(s)
    for to in reviewers:
        service._mail(s, to, f"[OPT access] {len(lines)} {title}", body, "digest")
    return len(reviewers)
