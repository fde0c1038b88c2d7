"""Document quality filters (configurable per source); each returns the reason a document is dropped."""

from __future__ import annotations

import string

from opt.data.config import FilterConfig

_ASCII_ALNUM = (string.ascii_letters + string.digits).encode("ascii")


def drop_reason(text: str, f: FilterConfig) -> str | None:
    """The first filter `text` (already normalised) fails, or None if it is kept."""
    n = len(text)
    if n < f.min_chars:
        return "too_short"
    if n > f.max_chars:
        return "gigantic"
    words = text.split()
    if len(words) < f.min_words:
        return "too_few_words"
    visible = sum(map(len, words))  # characters that are not whitespace
    if visible:
        # ASCII text (most of it): count letters and digits in C by deleting them from the bytes
        alnum = n - len(text.encode("ascii").translate(None, _ASCII_ALNUM)) if text.isascii() else sum(map(str.isalnum, text))
        if (visible - alnum) / visible > f.max_symbol_ratio:
            return "symbols"
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) >= 4:
        repeated = len(lines) - len(set(lines))
        if repeated / len(lines) > f.max_duplicate_line_ratio:
            return "repeated_lines"
    return None
