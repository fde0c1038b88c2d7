"""Email through a real local SMTP server (aiosmtpd): reviewers hear of requests, requesters of decisions, and a mail
outage neither blocks nor loses a decision: the message waits in the outbox and goes out once the server is back."""

from __future__ import annotations

import contextlib
import email
from datetime import timedelta

import pytest

from opt.config import MailConfig
from tests.conftest import _free_port


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def to(self, addr: str) -> list[email.message.Message]:
        return [m for m in self.messages if m["To"] == addr]


@pytest.fixture
def smtp(world):
    from aiosmtpd.controller import Controller

    inbox, port = _Inbox(), _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    before = world.service.mail_settings
    world.service.mail_settings = MailConfig(host="127.0.0.1", port=port, security="none", portal_url=f"{world.srv.url}/portal")
    try:
        yield inbox, controller, port
    finally:
        world.service.mail_settings = before
        with contextlib.suppress(AssertionError):  # the test stopped it already (the outage)
            controller.stop()


def _drain(service) -> dict[str, int]:
    """Send until nothing due is left (the session's earlier tests leave messages in the outbox too)."""
    total = {"sent": 0, "failed": 0}
    while True:
        r = service.send_outbox()
        total = {k: total[k] + r[k] for k in total}
        if r["sent"] == 0 or r["failed"]:
            return total


def _addr(who) -> str:
    return f"{who.name}@uni.edu"


def test_requests_and_decisions_are_mailed_and_survive_an_outage(world, smtp, monkeypatch):
    from aiosmtpd.controller import Controller

    inbox, controller, port = smtp
    researcher, reviewer = world.person(), world.person("reviewer")
    model, version, _ = world.release()
    req = world.request(researcher, model, version)
    assert _drain(world.service)["failed"] == 0
    told = inbox.to(_addr(reviewer))
    assert told and f"request {req['id']}" in told[-1]["Subject"] and f"{world.srv.url}/portal/review" in told[-1].get_payload()

    assert reviewer.http.post(f"/v1/requests/{req['id']}/approve", json={"quota": 2}).status_code == 200
    _drain(world.service)
    approved = inbox.to(_addr(researcher))[-1]
    assert "approved" in approved["Subject"] and f"optctl access download {model} {version}" in approved.get_payload()

    controller.stop()  # the mail server goes away
    m2, v2, _ = world.release()
    second = world.request(researcher, m2, v2)
    r = reviewer.http.post(f"/v1/requests/{second['id']}/deny", json={"reason": "name the sizes you need"})
    assert r.status_code == 200 and r.json()["status"] == "denied"  # the decision does not wait for mail
    result = world.service.send_outbox()
    assert result["sent"] == 0 and result["failed"] >= 1
    waiting = [m for m in world.service.outbox(unsent_only=True) if m.to_addr == _addr(researcher)]
    assert waiting and waiting[-1].last_error and waiting[-1].attempts == 1 and "denied" in waiting[-1].subject
    assert world.service.send_outbox()["failed"] == 0  # not due again yet: backoff, no hammering

    back = Controller(inbox, hostname="127.0.0.1", port=port)  # the server returns
    back.start()
    try:
        later = world.service._now() + timedelta(minutes=5)
        monkeypatch.setattr(world.service, "_clock", lambda: later)
        assert _drain(world.service)["sent"] >= 1
    finally:
        back.stop()
    denied = inbox.to(_addr(researcher))[-1]
    assert "denied" in denied["Subject"] and "name the sizes you need" in denied.get_payload()
    assert not [m for m in world.service.outbox(unsent_only=True) if m.to_addr == _addr(researcher)]


def test_reviewers_on_the_digest_hear_once_a_day(world, smtp):
    from opt.access.housekeeping import run_housekeeping

    inbox, _, port = smtp
    world.service.mail_settings = MailConfig(host="127.0.0.1", port=port, security="none", reviewers="digest")
    researcher, reviewer = world.person(), world.person("reviewer")
    model, version, _ = world.release()
    req = world.request(researcher, model, version)
    _drain(world.service)
    assert not [m for m in inbox.to(_addr(reviewer)) if f"request {req['id']}" in m["Subject"]]  # nothing at once
    report = run_housekeeping(world.service, remind_after_hours=48)
    assert report.mailed >= 1
    _drain(world.service)
    digest = inbox.to(_addr(reviewer))[-1]
    assert "waiting for a review" in digest["Subject"] and f"request {req['id']}: {researcher.name}" in digest.get_payload()
