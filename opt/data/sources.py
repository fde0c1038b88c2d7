"""The records input readers produce (opt/data/readers.py, opt/data/reddit.py)."""

from __future__ import annotations

from dataclasses import dataclass

from opt.errors import OptError


class SourceError(OptError):
    """A source that cannot be read at all (missing, empty, unreadable); the run fails naming it."""


@dataclass(frozen=True)
class Document:
    source: str
    file: str
    line: int
    text: str
    doc_id: str | None = None


@dataclass(frozen=True)
class Rejected:
    """An input record that could not be used; it goes to `quarantine/` with its reason."""

    source: str
    file: str
    line: int
    reason: str
    excerpt: str
