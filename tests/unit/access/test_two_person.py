"""Two-person approval (`access.two_person_models`), over HTTP: one reviewer's approval is recorded and grants
nothing; the same reviewer cannot give the second; another reviewer's approval makes the grant. Refusals audited."""

from __future__ import annotations

import pytest


@pytest.fixture
def two_person(world):
    model = "opt-175b-gated"
    before = world.service.two_person_models
    world.service.two_person_models = frozenset({model})
    try:
        yield model
    finally:
        world.service.two_person_models = before


def test_a_175b_class_grant_needs_two_reviewers(world, two_person):
    researcher, first, second = world.person(), world.person("reviewer"), world.person("reviewer")
    _, version, _ = world.release(model=two_person)
    req = world.request(researcher, two_person, version)

    r = first.http.post(f"/v1/requests/{req['id']}/approve", json={"quota": 2})
    assert r.status_code == 202 and r.json()["status"] == "pending" and r.json()["first_approved_at"]
    assert researcher.http.get("/v1/grants").json() == []  # nothing granted yet

    again = first.http.post(f"/v1/requests/{req['id']}/approve", json={"quota": 2})
    assert again.status_code == 403 and "another reviewer" in again.json()["detail"]
    assert [e for e in world.refused(first.name, "request.approve") if e["subject"] == f"request:{req['id']}"]

    own = researcher.http.post(f"/v1/requests/{req['id']}/approve", json={})
    assert own.status_code == 403  # a researcher is no reviewer, first or second

    done = second.http.post(f"/v1/requests/{req['id']}/approve", json={"quota": 2})
    assert done.status_code == 200 and done.json()["download_quota"] == 2
    actions = [e["action"] for e in world.audit(subject=f"request:{req['id']}")]
    assert actions.index("request.approved_first") < actions.index("request.approved")


def test_other_models_need_one_reviewer(world, two_person):
    researcher, reviewer = world.person(), world.person("reviewer")
    model, version, _ = world.release()
    req = world.request(researcher, model, version)
    assert reviewer.http.post(f"/v1/requests/{req['id']}/approve", json={}).status_code == 200
