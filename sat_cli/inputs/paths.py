"""File names as the OS holds them (bytes on Linux) and their text forms.

Python gives undecodable bytes of a name as lone surrogates (``os.fsdecode``); SQLite, JSON and
terminals cannot take those. sat stores every path twice: its exact bytes (``images.path_bytes``,
the key) and a readable text form (``images.path``) where each byte that is not UTF-8 reads
``\\xNN``. Exports and terminal output use the forms below; every consumer that opens the file
again uses :func:`from_bytes` of the stored bytes.
"""

from __future__ import annotations

import os
import re

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def to_bytes(path) -> bytes:
    """The exact bytes of a path (str with surrogate escapes, bytes or PathLike)."""
    return os.fsencode(path)


def from_bytes(raw: bytes) -> str:
    """The str that opens the file again (undecodable bytes as surrogate escapes)."""
    return os.fsdecode(raw)


def display(path) -> str:
    """Readable text of a path: valid UTF-8 as is, each other byte as ``\\xNN`` (what
    ``images.path`` stores and CSV and JSON show)."""
    return to_bytes(path).decode("utf-8", "backslashreplace")


def is_faithful(path) -> bool:
    """True when the text form is the name itself (the name is valid UTF-8)."""
    try:
        to_bytes(path).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    if "\udc80" <= ch <= "\udcff":  # an undecodable byte
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def tsv_field(value) -> str:
    """A TSV field that cannot break the format and can be undone: backslash as ``\\\\``, tab,
    newline and carriage return as ``\\t`` ``\\n`` ``\\r``, other control characters and
    undecodable bytes (surrogate escapes) as ``\\xNN`` (PostgreSQL's text COPY format)."""
    if value is None:
        return ""
    text = (value if isinstance(value, str) else str(value)).replace("\\", "\\\\")
    return _UNSAFE.sub(lambda m: _escape_char(m.group()), text)


def printable(value) -> str:
    """Text safe for a terminal: control characters (escape sequences, newlines, tabs) and
    undecodable bytes shown as escapes, never sent raw."""
    text = value if isinstance(value, str) else os.fsdecode(value) if isinstance(value, bytes) else str(value)
    return _UNSAFE.sub(lambda m: _escape_char(m.group()), text)
