"""Account names a reviewer can trust, and text that cannot forge a terminal line."""

from __future__ import annotations

import pytest

from opt.access.errors import AccessError
from opt.access.names import clean_text, normalise_name, skeleton, terminal_safe


@pytest.mark.parametrize("raw", ["Mallory", "MALLORY", "ｍａｌｌｏｒｙ", "mallory"])
def test_case_and_width_variants_are_one_name(raw: str) -> None:
    assert normalise_name(raw) == "mallory"


@pytest.mark.parametrize(
    "raw, why",
    [
        ("mallory\u200b", "U\\+200B ZERO WIDTH SPACE"),
        ("mal\u202elory", "U\\+202E RIGHT-TO-LEFT OVERRIDE"),
        ("mal lory", "U\\+0020"),
        ("mallory\n", "U\\+000A"),
        ("m\u0430llory", "ASCII"),  # Cyrillic a: looks Latin, is not, and no normal form joins the two
        ("_mallory", "must start with a letter or digit"),
        ("x" * 65, "at most 64"),
        ("", "required"),
    ],
)
def test_names_a_reader_could_mistake_are_refused(raw: str, why: str) -> None:
    with pytest.raises(AccessError, match=why):
        normalise_name(raw)


def test_look_alikes_share_a_skeleton() -> None:
    assert skeleton("rnallory") == skeleton("mallory") == skeleton("ma1lory") == skeleton("mai1ory")
    assert skeleton("b0b") == skeleton("bob") and skeleton("alice") != skeleton("alicia")


def test_free_text_keeps_newlines_only_where_allowed() -> None:
    assert clean_text("  Uni of X  ", "affiliation", 50) == "Uni of X"
    assert clean_text("line one\nline two", "purpose", 100, multiline=True) == "line one\nline two"
    for bad in ("a\nb", "a\x1b[31mb", "a\u200bb", "a\x00b"):
        with pytest.raises(AccessError, match="control or invisible characters"):
            clean_text(bad, "affiliation", 50)
    with pytest.raises(AccessError, match="at least 20"):
        clean_text("too short", "purpose", 100, min_len=20)


def test_terminal_safe_shows_controls_as_escapes_on_one_line() -> None:
    shown = terminal_safe("ok\nFORGED 12:00 admin approved\x1b[2J\u202e")
    assert "\n" not in shown and "\x1b" not in shown and "\u202e" not in shown
    assert shown == "ok\\nFORGED 12:00 admin approved\\x1b[2J\\u202e"
    assert terminal_safe("Zürich — ok") == "Zürich — ok"
