"""Account names and the text people see: normalised, refused when ambiguous, escaped when shown.

Names are compared after NFKC normalisation and case folding (`Mallory`, `ｍａｌｌｏｒｙ` and `MALLORY` are one
account), must then be ASCII letters, digits, '.', '-' and '_' (as GitHub's and most registries' handles), and are
refused when they hold characters a reader cannot see (zero-width spaces, bidi overrides, other format and control
characters) or when they look like an existing name (`skeleton`: `rn`/`m`, `0`/`o`, `1`/`l`...): a reviewer must
never read one name and act on another. Every text from a user
that is printed on a terminal goes through `terminal_safe`, so a newline or an escape sequence cannot forge a line
or recolour the screen; pages escape HTML on their own (Jinja2 autoescape).
"""

from __future__ import annotations

import re
import unicodedata

from opt.access.errors import AccessError

NAME_LEN = 64
# Unicode categories no account name may hold: Cc control, Cf format (zero-width, bidi), Co private use,
# Cs surrogates, Cn unassigned, Zl/Zp line and paragraph separators; spaces too (names are handles).
_FORBIDDEN = {"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp", "Zs"}
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
# ASCII look-alikes folded together for the collision check (after case folding): `rn` reads as `m`, `0` as `o`...
_SKELETON = [("rn", "m"), ("vv", "w"), ("cl", "d"), ("0", "o"), ("1", "l"), ("i", "l"), ("|", "l"), ("5", "s"), ("_", "-"), (".", "-")]


def normalise_name(raw: str, field: str = "name") -> str:
    """The canonical form of an account name, or AccessError naming what is wrong with it."""
    if not isinstance(raw, str) or not raw:
        raise AccessError(f"{field} is required")
    bad = [ch for ch in raw if unicodedata.category(ch) in _FORBIDDEN]
    if bad:
        shown = ", ".join(f"U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}" for ch in dict.fromkeys(bad))
        raise AccessError(f"{field} holds invisible, space or control characters ({shown}); use letters, digits, '.', '-' and '_'")
    name = unicodedata.normalize("NFKC", raw).casefold()
    if len(name) > NAME_LEN:
        raise AccessError(f"{field} is {len(name)} characters; at most {NAME_LEN} are allowed")
    if not _NAME.fullmatch(name):
        # ASCII only: Cyrillic 'а' and Latin 'a' look the same and no normal form joins them
        raise AccessError(
            f"{field} {terminal_safe(raw)} must start with a letter or digit and hold only ASCII letters, digits, '.', '-' and '_'"
        )
    return name


def skeleton(name: str) -> str:
    """What a normalised name looks like to a reader: two names with one skeleton are refused as look-alikes."""
    for a, b in _SKELETON:
        name = name.replace(a, b)
    return name


def clean_text(raw: str, field: str, max_len: int, min_len: int = 1, multiline: bool = False) -> str:
    """Free text from a user (affiliation, purpose, reason): stripped, bounded, without control characters.

    Newlines and tabs are kept only in `multiline` fields; other control and format characters are refused, since
    nobody types them and they only serve to hide or forge what a reviewer reads.
    """
    if not isinstance(raw, str):
        raise AccessError(f"{field} must be text")
    text = unicodedata.normalize("NFC", raw).strip()
    allowed = {"\n", "\t"} if multiline else set()
    bad = [ch for ch in text if ch not in allowed and unicodedata.category(ch) in {"Cc", "Cf", "Co", "Cs", "Zl", "Zp"}]
    if bad:
        shown = ", ".join(f"U+{ord(ch):04X}" for ch in dict.fromkeys(bad))
        raise AccessError(f"{field} holds control or invisible characters ({shown}); remove them")
    if len(text) < min_len:
        raise AccessError(f"{field} is required" if min_len == 1 else f"{field} is {len(text)} characters; at least {min_len} are needed")
    if len(text) > max_len:
        raise AccessError(f"{field} is {len(text)} characters; at most {max_len} are allowed")
    return text


def terminal_safe(text: object) -> str:
    """`text` with every control, format and separator character shown as an escape: one line, no terminal codes."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"}:
            out.append(ch.encode("unicode_escape").decode("ascii") if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)
