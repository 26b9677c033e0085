r"""Source file names as text: lossless, valid Unicode and printable, whatever bytes the name holds.

A name as the OS gives it (`os.fsdecode`, undecodable bytes as surrogates) becomes the text that the
manifest, the store's `source_path` and `quarantine/path` arrays and the CSVs hold (`path_text`), and
back (`fs_path`). Ordinary names are their own text. A name that is not valid UTF-8, holds a control
character or starts with a double quote is written in double quotes with C-style escapes, as git's
`core.quotePath` does: `"caf\xe9.dcm"` for the Latin-1 bytes `caf\xe9.dcm`.
"""

from __future__ import annotations

import re

__all__ = ["display_name", "fs_path", "path_text"]

# What makes a name need quoting: undecodable bytes (surrogates from `surrogateescape`), C0/C1 controls
# and DEL (a newline in a name would break every line-based listing), or a leading quote (so that an
# ordinary name can never read as a quoted one).
_NEEDS_QUOTE = re.compile('^"|[\x00-\x1f\x7f-\x9f\ud800-\udfff]')
_ESCAPE = re.compile('[\\\\"\x00-\x1f\x7f-\x9f\ud800-\udfff]')
_UNESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|\\|")')


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if c in '\\"':
        return "\\" + c
    code = ord(c)
    if code >= 0xDC80:  # an undecodable byte, as `surrogateescape` carries it
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"  # a C1 control or a lone surrogate that is not an escaped byte


def _unescape(m: re.Match[str]) -> str:
    e = m.group(1)
    if e[0] == "x":
        code = int(e[1:], 16)
        return chr(code if code < 0x80 else 0xDC00 + code)
    if e[0] == "u":
        return chr(int(e[1:], 16))
    return e


def path_text(name: str) -> str:
    """The text kept for the file name `name` (as `os.fsdecode` gives it); `fs_path` inverts it."""
    # `isprintable` first: one C call that clears nearly every name of a real archive.
    if (name.isprintable() and not name.startswith('"')) or not _NEEDS_QUOTE.search(name):
        return name
    return '"' + _ESCAPE.sub(_escape, name) + '"'


def fs_path(text: str) -> str:
    """The file name (for `open`, `os.stat`: undecodable bytes as surrogates) that `text` stands for."""
    if len(text) < 2 or not text.startswith('"') or not text.endswith('"'):
        return text
    return _UNESCAPE.sub(_unescape, text[1:-1])


def display_name(name: str) -> str:
    r"""`name` as text any font or terminal can show: its bytes read as UTF-8, others as `\xNN`.

    For names drawn in a figure. A name that the OS decoded as ASCII (the C locale, where `é` arrives
    as two undecodable bytes) shows as the UTF-8 name it is; text that is already Unicode is unchanged.
    """
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
