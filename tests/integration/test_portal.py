"""The portal as people use it, in headless Chromium against the session's access service (real HTTP).

A researcher signs in and files a request; a reviewer sees it in the queue, oldest first, and approves it; the
researcher sees the grant and the command that downloads; a revoked grant shows as revoked; a form posted without
its CSRF token is refused and audited; a wrong password is refused and, after repeated tries, rate-limited; what a
requester typed is shown as text, never as markup. Screenshots go to test-output/screenshots/.
"""

from __future__ import annotations

import pytest

from opt.access.auth import FailureLimiter
from tests.browser import chromium, screenshot

PASSWORD = "correct horse battery staple"


def _sign_in(page, url: str, name: str, password: str = PASSWORD) -> None:
    page.goto(f"{url}/portal/", wait_until="load")
    assert page.url.endswith("/portal/signin")  # not signed in: sent to sign in
    page.fill("#name", name)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_load_state("load")


def test_a_request_from_form_to_grant_to_revocation(world):
    researcher, reviewer = world.person(), world.person("reviewer")
    for who in (researcher, reviewer):
        world.service.set_password(who.name, PASSWORD)
    model, version, _ = world.release()
    url = world.srv.url
    with chromium() as browser:
        page = browser.new_page()
        _sign_in(page, url, researcher.name)
        assert page.url.endswith("/portal/") and researcher.name in page.inner_text("header")
        cookie = next(c for c in browser.cookies() if c["name"] == "opt_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
        page.click(f"a[href='/portal/request?model={model}&version={version}']")
        assert "Non-commercial research only." in page.inner_text("pre.licence")  # the licence text is shown
        page.fill("#affiliation", "University of Somewhere")
        page.select_option("#organisation_kind", "academic")
        page.fill("#purpose", "Measure <script>alert('x')</script> memorisation across OPT sizes")
        page.check("input[name=accept]")
        screenshot(page, "portal-request-form")
        page.click("button.primary")
        page.wait_for_load_state("load")
        row = page.locator("tr.request").first
        assert "pending" in row.inner_text() and f"{model} v{version}" in row.inner_text()
        request_id = row.get_attribute("data-request")
        screenshot(page, "portal-my-requests")

        browser.clear_cookies()
        _sign_in(page, url, reviewer.name)
        page.goto(f"{url}/portal/review", wait_until="load")
        card = page.locator(f"article[data-request='{request_id}']")
        assert researcher.name in card.inner_text() and "University of Somewhere" in card.inner_text()
        assert "<script>alert('x')</script>" in card.locator("pre").inner_text()  # shown as the text it is
        assert page.locator("main script").count() == 0
        card.locator("input[name=days]").fill("10")
        card.locator("input[name=quota]").fill("2")
        screenshot(page, "portal-review-queue")
        card.get_by_role("button", name="Approve").click()
        page.wait_for_load_state("load")
        assert f"request {request_id} approved" in page.inner_text("p.done")

        browser.clear_cookies()
        _sign_in(page, url, researcher.name)
        grant = page.locator("tr.grant").first
        assert "active" in grant.inner_text() and "2 of 2" in grant.inner_text()
        command = grant.locator("code.command").inner_text()
        assert f"optctl access download {model} {version} --server {url}" in command
        screenshot(page, "portal-grant")
        grant_id = grant.get_attribute("data-grant")

        browser.clear_cookies()
        _sign_in(page, url, reviewer.name)
        page.goto(f"{url}/portal/review", wait_until="load")
        row = page.locator(f"tr.grant[data-grant='{grant_id}']")
        row.locator("input[name=reason]").fill("affiliation could not be confirmed")
        row.get_by_role("button", name="Revoke").click()
        page.wait_for_load_state("load")

        browser.clear_cookies()
        _sign_in(page, url, researcher.name)
        state = page.locator(f"tr.grant[data-grant='{grant_id}'] td.state").inner_text()
        assert state == "revoked: affiliation could not be confirmed"
        assert page.locator(f"tr.grant[data-grant='{grant_id}'] code.command").count() == 0
        screenshot(page, "portal-grant-revoked")

        # a form posted from elsewhere (the session cookie rides along, the CSRF token does not) is refused
        forged = page.request.post(f"{url}/portal/request", form={"model": model, "version": version, "affiliation": "x",
                                   "organisation_kind": "academic", "purpose": "y" * 30, "accept": "yes"})  # fmt: skip
        assert forged.status == 403 and "CSRF" in forged.text()
    assert any(e["action"] == "input.refused" and "CSRF" in e["detail"].get("reason", "") for e in world.audit(actor=researcher.name))
    assert [e["action"] for e in world.audit(actor=researcher.name) if e["action"] == "signin"]


def test_a_wrong_password_is_refused_then_rate_limited(world):
    who = world.person()
    world.service.set_password(who.name, PASSWORD)
    state = world.srv.app.state
    session_limiter, state.limiter = state.limiter, FailureLimiter(max_failures=3, window_s=60)  # the session's is set very high
    try:
        _wrong_password_then_limited(world, who)
    finally:
        state.limiter = session_limiter
    refused = [e for e in world.audit(actor=who.name) if e["action"] == "signin.refused"]
    assert len(refused) == 3


def _wrong_password_then_limited(world, who) -> None:
    with chromium() as browser:
        page = browser.new_page()
        for _ in range(3):
            _sign_in(page, world.srv.url, who.name, "not the password at all")
            assert page.inner_text("p.error") == "Wrong account name or password."
        screenshot(page, "portal-wrong-password")
        _sign_in(page, world.srv.url, who.name)  # the right password, but too late
        assert "Too many failed sign-ins" in page.inner_text("p.error")
        screenshot(page, "portal-rate-limited")


@pytest.mark.parametrize("password", ["short", "x" * 2000])
def test_a_password_out_of_bounds_is_refused(world, password):
    from opt.access.errors import AccessError

    with pytest.raises(AccessError, match="12 to 1024 characters"):
        world.service.set_password(world.person().name, password)


def test_tokens_audit_a_denial_a_new_request_and_sign_out(world):
    import httpx

    researcher, reviewer = world.person(), world.person("reviewer")
    for who in (researcher, reviewer):
        world.service.set_password(who.name, PASSWORD)
    *_, earlier = world.granted(researcher, world.person("reviewer"))  # an earlier grant, of another release
    model, version, _ = world.release()
    first = world.request(researcher, model, version)
    assert reviewer.http.post(f"/v1/requests/{first['id']}/deny", json={"reason": "say which sizes you need"}).status_code == 200
    url = world.srv.url
    with chromium() as browser:
        page = browser.new_page()
        _sign_in(page, url, researcher.name)
        assert page.locator(f"tr.request[data-request='{first['id']}'] td.state").inner_text() == "denied: say which sizes you need"
        # a denied researcher applies again
        page.click(f"a[href='/portal/request?model={model}&version={version}']")
        page.fill("#affiliation", "University of Somewhere")
        page.select_option("#organisation_kind", "industry-research-lab")
        page.fill("#purpose", "Probe memorisation in the 125M and 1.3B sizes only")
        page.check("input[name=accept]")
        page.click("button.primary")
        page.wait_for_load_state("load")
        assert "pending" in page.locator("tr.request").first.inner_text()

        page.goto(f"{url}/portal/tokens", wait_until="load")
        page.fill("#label", "laptop")
        page.click("button.primary")
        token = page.locator("pre.new-token").inner_text().strip()
        assert httpx.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {token}"}).json()["name"] == researcher.name
        screenshot(page, "portal-new-token")
        page.goto(f"{url}/portal/tokens", wait_until="load")
        assert page.locator("pre.new-token").count() == 0  # shown once
        row = page.locator("tr.token", has_text="laptop")
        row.get_by_role("button", name="Revoke").click()
        page.wait_for_load_state("load")
        assert page.locator("tr.token", has_text="laptop").locator("td.state").inner_text() == "revoked"
        assert httpx.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401

        page.goto(f"{url}/portal/audit?actor={reviewer.name}", wait_until="load")  # a researcher reads only their own
        assert "Refused" in page.inner_text("h1") and page.locator("tr.audit").count() == 0
        page.click("header button")  # sign out
        page.wait_for_load_state("load")
        assert page.url.endswith("/portal/signin")
        page.goto(f"{url}/portal/", wait_until="load")
        assert page.url.endswith("/portal/signin")  # the session is over, not only the cookie

        _sign_in(page, url, reviewer.name)
        page.goto(f"{url}/portal/review", wait_until="load")  # the new request, with the requester's history
        card = page.locator("article.pending-request", has_text=researcher.name)
        assert f"request {first['id']} ({model} v{version}, denied: say which sizes you need)" in card.inner_text()
        assert f"grant {earlier['id']} (" in card.locator("p.their-grants").inner_text() and "active" in card.inner_text()
        page.goto(f"{url}/portal/audit?action=request.denied&subject=request:{first['id']}", wait_until="load")
        rows = page.locator("tr.audit")
        assert rows.count() == 1 and reviewer.name in rows.first.inner_text() and "say which sizes" in rows.first.inner_text()
        screenshot(page, "portal-audit-filtered")
