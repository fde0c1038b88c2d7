"""Text normalisation applied to every document before filtering and deduplication."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except tab and newline, which carry layout.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


_ASCII_CONTROL = bytes([*range(0, 9), *range(11, 32), 127])


def normalize(text: str) -> str:
    """NFC, newlines unified, control characters removed, trailing spaces and runs of blank lines collapsed.

    Each regex runs only when a cheap substring test says it can match: most documents need none of
    them, and this is on the hot path of every byte of the corpus.
    """
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii() or len(raw := text.encode("ascii")) != len(raw.translate(None, _ASCII_CONTROL)):
        text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()
