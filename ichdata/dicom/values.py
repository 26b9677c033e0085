"""Header values from the raw elements: text, numbers and the checks that name a missing one.

The header is pydicom's `Dataset` or the header walk's `Elements`; both hold raw elements, and the
values are decoded here rather than through pydicom's value conversion: RSNA's `ID_…` UIDs are not
valid UIDs and pydicom warns when converting them. Decoding the raw bytes avoids the warning without
touching the warning filters, which are process-wide and not thread-safe (Dask reads in threads).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, TypeAlias

from ichdata.dicom.meta import SliceError
from ichdata.dicom.tags import UNDEFINED_LENGTH, describe
from ichdata.reasons import Reason

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from ichdata.dicom.walk import Elements

__all__ = [
    "Header",
    "floats",
    "integer",
    "joined",
    "last_element_end",
    "require_floats",
    "require_positive",
    "require_text",
    "text",
    "uint",
    "values",
]

#: What the accessors read: pydicom's dataset, or the raw elements of the header walk.
Header: TypeAlias = "Dataset | Elements"


def _decode_text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")  # one-to-one on bytes: distinct ids stay distinct


def values(ds: Header, tag: int) -> list[str] | None:
    """The text values of a string element (CS, DS, IS, LO, SH, UI), or None when absent/empty.

    Read from the raw element, so pydicom neither converts nor validates the value.
    """
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return None
    value = elem.value
    if value is None or value == b"" or value == "":
        return None
    if isinstance(value, bytes):
        parts = _decode_text(value).split("\\")
    elif isinstance(value, str):
        parts = value.split("\\")
    elif isinstance(value, list | tuple) or hasattr(value, "__iter__"):
        parts = [str(v) for v in value]
    else:
        parts = [str(value)]
    parts = [p.strip(" \x00") for p in parts]
    return parts if any(parts) else None


def text(ds: Header, tag: int) -> str | None:
    """The first text value of a string element; None when absent or empty."""
    found = values(ds, tag)
    return found[0] if found else None


def uint(ds: Header, tag: int) -> int | None:
    """A binary US/UL value from the raw element; None when absent or empty."""
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None or elem.value is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        if len(value) < 2:
            return None
        little = getattr(elem, "is_little_endian", True)
        return int.from_bytes(
            value[: 4 if len(value) == 4 else 2], "little" if little else "big", signed=False
        )
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def integer(ds: Header, tag: int) -> int | None:
    """An IS (integer string) value; None when absent, empty or not an integer."""
    found = text(ds, tag)
    if found is None:
        return None
    try:
        number = float(found)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def joined(found: list[str] | list[float] | None) -> str:
    """Values as DICOM writes them, backslash-separated (floats in `%g`), for error messages."""
    return "\\".join(f"{v:g}" if isinstance(v, float) else v for v in found or [])


def floats(ds: Header, tag: int) -> list[float] | None:
    """The values of a DS (decimal string) element; None when absent, empty or not all numbers."""
    found = values(ds, tag)
    if found is None:
        return None
    try:
        return [float(v) for v in found]
    except ValueError:
        return None


def require_text(path: str | os.PathLike[str], ds: Header, tag: int, keyword: str) -> str:
    """`text(ds, tag)`; raises `SliceError` (`missing_uid`) when it is absent or empty."""
    value = text(ds, tag)
    if value is None:
        raise SliceError(path, Reason.MISSING_UID, f"{describe(tag, keyword)} is missing")
    return value


def require_floats(path: str | os.PathLike[str], ds: Header, tag: int, keyword: str, n: int) -> list[float]:
    """`n` finite numbers from a DS element; raises `SliceError` (`missing_geometry`) otherwise."""
    found = floats(ds, tag)
    if found is None:
        raw = values(ds, tag)
        what = "missing" if raw is None else repr(joined(raw))
        raise SliceError(
            path, Reason.MISSING_GEOMETRY, f"{describe(tag, keyword)} is {what}, {n} numbers expected"
        )
    if len(found) != n or not all(math.isfinite(v) for v in found):
        raise SliceError(
            path,
            Reason.MISSING_GEOMETRY,
            f"{describe(tag, keyword)} is {joined(found)}, {n} finite numbers expected",
        )
    return found


def require_positive(path: str | os.PathLike[str], ds: Header, tag: int, keyword: str) -> int:
    """A positive US value; raises `SliceError` (`undecodable`) when it is absent or 0."""
    value = uint(ds, tag)
    if not value:
        what = "missing" if value is None else "0"
        raise SliceError(
            path, Reason.UNDECODABLE, f"{describe(tag, keyword)} is {what}, a positive number expected"
        )
    return value


def last_element_end(ds: Header) -> int | None:
    """The file offset where the last element read ends (None when unknown, e.g. undefined length)."""
    if len(ds) == 0:
        return None
    last = ds.get_item(max(ds.keys()), keep_deferred=True)
    if last is None or not hasattr(last, "value_tell"):
        return None
    length = getattr(last, "length", None)
    if length is None or length == UNDEFINED_LENGTH or last.value is None:
        return None
    return int(last.value_tell) + int(length)
