"""Access housekeeping over the session's real service: expiry recorded once, reminders by age, the chain verified.

The service's clock is moved forward (its `_clock`), as days passing would: the grant expires and the request waits.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from opt.access.housekeeping import ACTOR, run_housekeeping


def test_expired_grants_are_recorded_once_and_old_requests_reminded(world, monkeypatch):
    researcher, reviewer, other = world.person(), world.person("reviewer"), world.person()
    model, version, grant = world.granted(researcher, reviewer)
    m2, v2, _ = world.release()
    waiting = world.request(other, m2, v2)
    start = world.service._now()

    fresh = run_housekeeping(world.service, remind_after_hours=48)
    assert grant["id"] not in [g["id"] for g in fresh.expired] and waiting["id"] not in [w["id"] for w in fresh.waiting]

    later = start + timedelta(days=120)  # past the grant's days (at most max_grant_days = 90) and the reminder age
    monkeypatch.setattr(world.service, "_clock", lambda: later)
    report = run_housekeeping(world.service, remind_after_hours=48)
    expired = {g["id"]: g for g in report.expired}
    assert expired[grant["id"]]["requester"] == researcher.name and expired[grant["id"]]["model"] == model
    reminded = {w["id"]: w for w in report.waiting}
    assert reminded[waiting["id"]]["hours"] >= 120 * 24 - 1 and reminded[waiting["id"]]["version"] == v2
    assert report.chain_ok and report.chain_entries > 0
    assert f"| {waiting['id']} | {other.name} |" in report.markdown()
    assert report.mailed >= 1  # the reviewers' reminder, in the outbox (sent by the running service)
    reminder = [m for m in world.service.outbox() if m.kind == "digest" and m.to_addr == f"{reviewer.name}@uni.edu"]
    assert reminder and f"request {waiting['id']}: {other.name}" in reminder[-1].body

    again = run_housekeeping(world.service, remind_after_hours=48)
    assert grant["id"] not in [g["id"] for g in again.expired]  # recorded once
    assert waiting["id"] in [w["id"] for w in again.waiting]  # still waiting: reminded again
    entries = world.audit(actor=ACTOR)
    assert [e["subject"] for e in entries if e["action"] == "grant.expired"].count(f"grant:{grant['id']}") == 1
    assert any(e["action"] == "audit.verified" for e in entries)

    monkeypatch.undo()  # back to today: the reviewer's token is valid again
    decided = reviewer.http.post(f"/v1/requests/{waiting['id']}/deny", json={"reason": "not a research use"})
    assert decided.status_code == 200, decided.text
    monkeypatch.setattr(world.service, "_clock", lambda: later)
    assert waiting["id"] not in [w["id"] for w in run_housekeeping(world.service, 48).waiting]  # decided: no more reminders


def test_housekeeping_from_the_command_line_reports_the_chain(tmp_path):
    home = tmp_path / "access"
    sets = ["--set", f"access.home={home}", "--set", f"access.db_url=sqlite:///{home / 'access.db'}",
            "--set", f"access.release_root={home / 'releases'}"]  # fmt: skip
    out = subprocess.run([str(Path(sys.executable).parent / "optctl"), "access", "housekeeping", *sets], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "audit chain: intact (0 entries)" in out.stdout and "requests waiting for a reviewer too long: 0" in out.stdout
