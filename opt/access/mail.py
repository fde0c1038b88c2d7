"""Email from the access service, through an outbox table.

A decision writes its messages in its own transaction (`_mail`, `_mail_reviewers`), so it commits with them or
not at all, and never waits for SMTP. `send_outbox` (a thread in the running service, and `optctl access mail
send`) hands due messages to the SMTP server in `access.mail`; a message the server does not take stays, with its
error, and is tried again later (backoff doubling from 30 s to an hour) until it is sent. Reviewers hear of new
requests at once (`access.mail.reviewers: immediate`) or in the daily housekeeping digest (`digest`); requesters
hear of every decision on their requests.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import threading
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from opt.access.core import Core
from opt.access.db import OutboxMessage, Role, User

log = logging.getLogger(__name__)
BACKOFF_FIRST_S = 30
BACKOFF_MAX_S = 3600


class Mail(Core):
    mail_settings: Any = None
    """`access.mail` (opt/config.py MailConfig), or None: messages are kept in the outbox, and none is sent."""

    def _mail(self, s: Session, to: str, subject: str, body: str, kind: str) -> None:
        now = self._now()
        s.add(OutboxMessage(to_addr=to, subject=subject[:300], body=body, kind=kind, created_at=now, next_attempt_at=now, attempts=0))

    def _reviewer_emails(self, s: Session, except_user: int | None = None) -> list[str]:
        rows = s.scalars(select(User).where(User.role.in_([Role.REVIEWER, Role.ADMIN]), User.disabled_at.is_(None)).order_by(User.id))
        return [u.email for u in rows if u.id != except_user]

    def _mail_reviewers(self, s: Session, subject: str, body: str, kind: str, except_user: int | None = None) -> None:
        if self.mail_settings is not None and self.mail_settings.reviewers == "digest":
            return  # the daily digest tells them
        for to in self._reviewer_emails(s, except_user):
            self._mail(s, to, subject, body, kind)

    def portal_link(self, path: str) -> str:
        base = (self.mail_settings.portal_url if self.mail_settings is not None else "") or ""
        return f"{base.rstrip('/')}{path}"

    def send_outbox(self, limit: int = 100) -> dict[str, int]:
        """Send the messages that are due; returns how many were sent and how many failed (kept for later)."""
        cfg = self.mail_settings
        if cfg is None or not cfg.host:
            return {"sent": 0, "failed": 0}
        now = self._now()
        with self._sessions() as s:
            due = list(s.scalars(select(OutboxMessage).where(OutboxMessage.sent_at.is_(None), OutboxMessage.next_attempt_at <= now)
                                 .order_by(OutboxMessage.id).limit(limit)))  # fmt: skip
        sent = failed = 0
        for m in due:
            error = None
            try:
                _deliver(cfg, m.to_addr, m.subject, m.body)
            except (OSError, smtplib.SMTPException) as e:
                error = f"{type(e).__name__}: {e}"[:1000]
            with self._sessions.begin() as s:
                row = s.get(OutboxMessage, m.id)
                assert row is not None
                row.attempts += 1
                if error is None:
                    row.sent_at, row.last_error = self._now(), None
                    sent += 1
                else:
                    wait = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (row.attempts - 1))
                    row.last_error, row.next_attempt_at = error, self._now() + timedelta(seconds=wait)
                    failed += 1
        return {"sent": sent, "failed": failed}

    def outbox(self, unsent_only: bool = False) -> list[OutboxMessage]:
        with self._sessions() as s:
            q = select(OutboxMessage).order_by(OutboxMessage.id)
            if unsent_only:
                q = q.where(OutboxMessage.sent_at.is_(None))
            return list(s.scalars(q))


def _deliver(cfg: Any, to: str, subject: str, body: str) -> None:
    import os

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = cfg.sender, to, subject
    msg.set_content(body)
    if cfg.security == "ssl":
        client: smtplib.SMTP = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout_s, context=ssl.create_default_context())
    else:
        client = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_s)
    with client:
        if cfg.security == "starttls":
            client.starttls(context=ssl.create_default_context())
        if cfg.username:
            client.login(cfg.username, os.environ.get(cfg.password_env, ""))
        client.send_message(msg)


class OutboxSender:
    """The running service's sender: `send_outbox` every `interval_s` in a daemon thread until stopped."""

    def __init__(self, service: Mail, interval_s: float) -> None:
        self.service, self.interval_s = service, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="access-outbox", daemon=True)

    def start(self) -> OutboxSender:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.service.send_outbox()
            except Exception as e:  # a database hiccup: the next round tries again; decisions are unaffected
                log.warning("outbox: %s: %s (retrying in %.0f s)", type(e).__name__, e, self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
