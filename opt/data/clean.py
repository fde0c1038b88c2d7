"""Text normalisation and the document filters, each drop counted by reason."""

from __future__ import annotations

import hashlib
import re
import unicodedata

# C0/C1 control characters except tab and newline, which carry layout.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC, newlines unified, control characters removed, trailing spaces and runs of blank lines collapsed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def content_hash(text: str) -> str:
    """Exact-duplicate key: sha256 of the normalised text with whitespace runs collapsed and lowercased."""
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()
