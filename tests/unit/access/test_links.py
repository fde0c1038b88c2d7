"""Signed download tokens: round trip, expiry, and every kind of tampering refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from opt.access import links
from opt.access.links import AccessDenied, AccessError, LinkPayload

SECRET = b"k" * 32
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _token(secret: bytes = SECRET, ttl: timedelta = timedelta(hours=1)) -> tuple[str, LinkPayload]:
    payload = links.new_payload(7, "opt-175b", "3", T0 + ttl)
    return links.sign(payload, secret), payload


def _flip(s: str, i: int) -> str:
    return s[:i] + ("A" if s[i] != "A" else "B") + s[i + 1 :]


def _denied(token: str, secret: bytes = SECRET, now: datetime = T0) -> str:
    with pytest.raises(AccessDenied) as exc:
        links.verify(token, secret, now)
    return exc.value.reason


def test_round_trip_and_url_form() -> None:
    token, payload = _token()
    assert links.verify(token, SECRET, T0) == payload
    assert links.verify(links.LINK_SCHEME + token, SECRET, T0) == payload
    assert payload.expires_at == T0 + timedelta(hours=1)
    assert token.count(".") == 1 and "=" not in token
    body = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert body == {"grant": 7, "model": "opt-175b", "version": "3", "exp": payload.exp, "nonce": payload.nonce}


def test_nonce_makes_every_token_unique() -> None:
    assert _token()[0] != _token()[0]


def test_expired_from_the_expiry_second_on() -> None:
    token, _ = _token()
    assert links.verify(token, SECRET, T0 + timedelta(minutes=59, seconds=59))
    assert _denied(token, now=T0 + timedelta(hours=1)) == "link expired"


def test_every_changed_character_is_refused() -> None:
    token, _ = _token()
    body, sig = token.split(".")
    for i in range(len(body)):  # including the last char, whose low bits base64 decoding would ignore
        assert _denied(f"{_flip(body, i)}.{sig}") == "signature invalid"
    for i in (0, len(sig) // 2, len(sig) - 1):
        assert _denied(f"{body}.{_flip(sig, i)}") == "signature invalid"


def test_forged_payload_with_old_signature_is_refused() -> None:
    token, payload = _token()
    body = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    body["version"] = "4"
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    assert _denied(f"{forged}.{token.split('.')[1]}") == "signature invalid"


def test_other_secret_is_refused() -> None:
    token, _ = _token(secret=b"x" * 32)
    assert _denied(token) == "signature invalid"


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "é.é", "." * 2, "x" * 5000, links.LINK_SCHEME])
def test_malformed_tokens_are_refused(token: str) -> None:
    assert _denied(token) == "signature invalid"


def test_peek_reads_without_trusting() -> None:
    token, payload = _token(secret=b"x" * 32)
    assert links.peek(token) == payload
    assert links.peek("garbage") is None


def test_short_secret_is_rejected() -> None:
    with pytest.raises(AccessError, match="at least 16 bytes"):
        _token(secret=b"short")


def test_denied_message_names_reason_and_remedy() -> None:
    token, _ = _token()
    with pytest.raises(AccessDenied, match=r"access denied: link expired; .*ask for a new one"):
        links.verify(token, SECRET, T0 + timedelta(days=1))
