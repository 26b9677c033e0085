"""Read one CT slice from a DICOM file: HU, the header facts the store needs, or the rendered windows.

The readers share one header pass:

- `read_header(path)` — the header only (the conversion's scan runs it on every file): `SliceMeta`,
  and every reason the file cannot be a slice that the header and the file size reveal, including
  truncated or short uncompressed pixel data;
- `read_slice(path)` — HU as float32 (rows, cols) and the `SliceMeta`;
- `read_rendered(path, size)` — uint8 (3, size, size) windows, within ±1 of
  `window_hu(read_slice(path)[0], size)`: the fast path of conversion and prediction. It never builds
  the HU image: stored values index a cached table that folds the unused-bit masking, the RSNA 12-bit
  correction, `(0028,1053) Rescale Slope`/`(0028,1052) Rescale Intercept` and the three windows;
- `read_header_layout(path)` / `read_rendered_layout(path, layout, size)` — the same split across the
  conversion's two passes: the scan keeps a short text saying where the pixel data lies and how it is
  encoded, and the shard task renders from it with one positioned read, without a second header parse
  (the full reader takes over whenever the file no longer matches the layout).

A file that is not a usable slice raises `SliceError` with a reason code from `REASONS` and a message
naming the file, the value found and what was expected.

HU follow DESIGN.md: HU = stored × RescaleSlope + RescaleIntercept, after the RSNA 12-bit correction
(`(0028,0101) Bits Stored` 12, `(0028,0103) Pixel Representation` 0 and RescaleIntercept > -100: add
1000 to the stored values, subtract 4096 from those ≥ 4096, use intercept -1000). Stored values are
taken from the `(0028,0101) Bits Stored` low bits, sign-extended when signed (as pydicom does).

DICOM is recognised by content (the 128-byte preamble and `DICM`), never by file name. The headers of
common files (Implicit/Explicit VR Little Endian, elements of defined length) are walked here
(`_walk_header`, 3× faster than `pydicom.dcmread`, the scan's main cost); everything else goes through
pydicom, with identical results. Header values are decoded from the raw elements rather than through
pydicom's value conversion: RSNA's `ID_…` UIDs are not valid UIDs and pydicom warns when converting
them. Decoding the raw bytes avoids the warning without touching the warning filters, which are
process-wide and not thread-safe (Dask runs reads in threads).
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeAlias, cast

import numpy as np
from pydicom import dcmread
from pydicom.charset import python_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.valuerep import VR as _VR

from ichdata.order import slice_position
from ichdata.windows import _check_size, _render_table_codes, _scratch, window_hu

__all__ = [
    "REASONS",
    "SliceError",
    "SliceMeta",
    "is_dicom",
    "read_header",
    "read_header_layout",
    "read_rendered",
    "read_rendered_layout",
    "read_slice",
]

REASONS: tuple[str, ...] = (
    "not_dicom",
    "empty",
    "truncated",
    "no_pixel_data",
    "size_mismatch",
    "not_ct",
    "colour",
    "localizer",
    "multi_frame",
    "missing_geometry",
    "undecodable",
    "unsupported_transfer_syntax",
    "not_image",
    "missing_uid",
)
"""Why a file is not a usable slice.

`not_image` is a DICOM file that is not an image at all (a DICOMDIR media directory);
`missing_uid` lacks `(0008,0018) SOP Instance UID`, `(0020,000D) Study Instance UID` or
`(0020,000E) Series Instance UID`, without which a slice cannot be placed in a series.
"""

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_NATIVE = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
}
# Compressed slices larger than this are refused before the decoder allocates their declared size:
# head CT is at most 1024×1024 in practice.
_MAX_COMPRESSED_SIDE = 4096

# Tags, (group << 16) | element.
_MEDIA_SOP_CLASS = 0x00020002
_TRANSFER_SYNTAX = 0x00020010
_IMAGE_TYPE = 0x00080008
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_MODALITY = 0x00080060
_PATIENT_ID = 0x00100020
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_INSTANCE_NUMBER = 0x00200013
_IMAGE_POSITION = 0x00200032
_IMAGE_ORIENTATION = 0x00200037
_SAMPLES_PER_PIXEL = 0x00280002
_PHOTOMETRIC = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_PIXEL_SPACING = 0x00280030
_BITS_ALLOCATED = 0x00280100
_BITS_STORED = 0x00280101
_PIXEL_REPRESENTATION = 0x00280103
_RESCALE_INTERCEPT = 0x00281052
_RESCALE_SLOPE = 0x00281053
_PIXEL_DATA = 0x7FE00010
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
_U16_PAIR, _U16, _U32 = struct.Struct("<HH"), struct.Struct("<H"), struct.Struct("<I")
#: Read headers with `_walk_header` where it applies (the tests turn it off to compare with pydicom).
_FAST_HEADER = True


class SliceError(Exception):
    """A file that is not a usable CT slice: `reason` is one of `REASONS`, `detail` says why.

    `str(e)` is `"<file name>: <detail>"`, e.g.
    `ID_6431af929.dcm: pixel data is 261,684 bytes, 524,288 expected for 512×512×16 bit`.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {', '.join(REASONS)}")
        self.path = os.fspath(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{os.path.basename(self.path)}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Dask and multiprocessing pickle exceptions; rebuild from the three fields.
        return (type(self), (self.path, self.reason, self.detail))


@dataclass(frozen=True)
class SliceMeta:
    """What the store and the ordering need from one slice's header, and nothing else."""

    image_id: str  # (0008,0018) SOP Instance UID (RSNA: the file stem, `ID_…`)
    study_uid: str  # (0020,000D) Study Instance UID
    series_uid: str  # (0020,000E) Series Instance UID
    patient_id: str  # (0010,0020) Patient ID ("" when absent)
    slice_position: float  # position along the slice normal, mm (see `ichdata.order.slice_position`)
    instance_number: int | None  # (0020,0013) Instance Number
    pixel_spacing: tuple[float, float]  # (0028,0030) Pixel Spacing: row spacing, column spacing, mm
    rows: int  # (0028,0010) Rows
    cols: int  # (0028,0011) Columns


@dataclass(frozen=True)
class _PixelLayout:
    """How to get the stored values: where the pixel data lies and how it is encoded."""

    transfer_syntax: UID
    encapsulated: bool
    big_endian: bool
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    value_offset: int  # file offset of the Pixel Data value (-1 when unknown: deflated)
    value_length: int  # bytes to read from value_offset (native: the expected size)
    table_key: tuple[Any, ...]  # the HU table: bits allocated/stored, signedness, slope, intercept
    inline: bytes | None = None  # the pixel data itself, when it was read with the header (deflated)
    element_offset: int = -1  # file offset of the (7FE0,0010) Pixel Data element's tag
    file_size: int = -1  # the file's size when the header was read


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """True if the file has the DICOM Part 10 preamble: 128 bytes, then `DICM`.

    Content, not the name: hospital exports have extensionless files. A DICOMDIR is DICOM too, but not
    a slice (`read_header` raises `SliceError` with reason `not_image`).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:  # a directory, a vanished or unreadable file
        return False
    return len(head) == 132 and head[128:] == b"DICM"


#: What the header accessors below read: pydicom's dataset, or the raw elements of `_walk_header`.
_Header: TypeAlias = "Dataset | _Elements"


def _fail(path: str | os.PathLike[str], reason: str, detail: str) -> SliceError:
    return SliceError(path, reason, detail)


def _decode_text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")  # one-to-one on bytes: distinct ids stay distinct


def _values(ds: _Header, tag: int) -> list[str] | None:
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
        text = _decode_text(value)
        parts = text.split("\\")
    elif isinstance(value, str):
        parts = value.split("\\")
    elif isinstance(value, list | tuple) or hasattr(value, "__iter__"):
        parts = [str(v) for v in value]
    else:
        parts = [str(value)]
    parts = [p.strip(" \x00") for p in parts]
    return parts if any(parts) else None


def _text(ds: _Header, tag: int) -> str | None:
    values = _values(ds, tag)
    return values[0] if values else None


def _uint(ds: _Header, tag: int) -> int | None:
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


def _integer(ds: _Header, tag: int) -> int | None:
    """An IS (integer string) value; None when absent, empty or not an integer."""
    text = _text(ds, tag)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _joined(values: list[str] | list[float] | None) -> str:
    return "\\".join(f"{v:g}" if isinstance(v, float) else v for v in values or [])


def _floats(ds: _Header, tag: int) -> list[float] | None:
    values = _values(ds, tag)
    if values is None:
        return None
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _describe(tag: int, keyword: str) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"


def _require_text(path: str | os.PathLike[str], ds: _Header, tag: int, keyword: str) -> str:
    value = _text(ds, tag)
    if value is None:
        raise _fail(path, "missing_uid", f"{_describe(tag, keyword)} is missing")
    return value


def _require_floats(path: str | os.PathLike[str], ds: _Header, tag: int, keyword: str, n: int) -> list[float]:
    values = _floats(ds, tag)
    if values is None:
        text = _values(ds, tag)
        found = "missing" if text is None else repr(_joined(text))
        raise _fail(path, "missing_geometry", f"{_describe(tag, keyword)} is {found}, {n} numbers expected")
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise _fail(
            path,
            "missing_geometry",
            f"{_describe(tag, keyword)} is {_joined(values)}, {n} finite numbers expected",
        )
    return values


def _require_positive(path: str | os.PathLike[str], ds: _Header, tag: int, keyword: str) -> int:
    value = _uint(ds, tag)
    if not value:
        found = "missing" if value is None else "0"
        raise _fail(path, "undecodable", f"{_describe(tag, keyword)} is {found}, a positive number expected")
    return value


def _last_element_end(ds: _Header) -> int | None:
    """The file offset where the last element read ends (None when unknown, e.g. undefined length)."""
    if len(ds) == 0:
        return None
    last = ds.get_item(max(ds.keys()), keep_deferred=True)
    if last is None or not hasattr(last, "value_tell"):
        return None
    length = getattr(last, "length", None)
    if length is None or length == _UNDEFINED_LENGTH or last.value is None:
        return None
    return int(last.value_tell) + int(length)


# ---------------------------------------------------------------------------------------------------
# The header walk of the common case, without pydicom's dataset machinery.
#
# `dcmread(stop_before_pixels=True)` costs ≈ 0.17 ms per RSNA header, most of the scan's time per file:
# it builds a Dataset, a Tag and a RawDataElement for every element and checks each against its stop
# callback. `_walk_header` reads the same bytes the same way for the files that make up nearly every
# archive (a well-formed file meta group; Implicit or Explicit VR Little Endian datasets, compressed
# ones included; elements of defined length up to the Pixel Data tag) and keeps only the elements
# `_read_header` looks at, as the same raw elements pydicom would hand it. Whatever it is not sure
# about (an undefined-length sequence, an unknown VR, an element that runs past the end of the file, a
# file meta group whose length disagrees with its elements, big-endian or deflated data) it leaves to
# pydicom by returning None, so the results, and every `SliceError`, are pydicom's by construction
# (`tests/ichdata/test_dicom.py` holds the two paths equal on every reason, pydicom's own test files
# and fuzzed files).

_WANTED = frozenset(
    {
        _MEDIA_SOP_CLASS,
        _TRANSFER_SYNTAX,
        _IMAGE_TYPE,
        _SOP_CLASS,
        _SOP_INSTANCE,
        _MODALITY,
        _PATIENT_ID,
        _STUDY_UID,
        _SERIES_UID,
        _INSTANCE_NUMBER,
        _IMAGE_POSITION,
        _IMAGE_ORIENTATION,
        _SAMPLES_PER_PIXEL,
        _PHOTOMETRIC,
        _NUMBER_OF_FRAMES,
        _ROWS,
        _COLUMNS,
        _PIXEL_SPACING,
        _BITS_ALLOCATED,
        _BITS_STORED,
        _PIXEL_REPRESENTATION,
        _RESCALE_INTERCEPT,
        _RESCALE_SLOPE,
    }
)
_PIXEL_TAGS = frozenset({_PIXEL_DATA, 0x7FE00008, 0x7FE00009})  # pydicom's stop_before_pixels set
_VR_KNOWN = frozenset(v.value.encode() for v in _VR if len(v.value) == 2)
_VR_LONG = frozenset(v.encode() for v in EXPLICIT_VR_LENGTH_32)  # 2 reserved bytes, 4-byte length
_SPECIFIC_CHARACTER_SET = 0x00080005
_CHARSETS = frozenset({b"", *(term.encode() for term in python_encoding)})
# Transfer syntax UID (bytes) → whether pydicom reads the dataset as Explicit VR (True) or Implicit VR
# (False) Little Endian; absent: what the walk leaves to pydicom (big endian, deflated, unknown). Looked
# up, never `UID()` of unknown bytes: pydicom validates those, and warns.
_DATASET_EXPLICIT = {
    ts.encode(): not ts.is_implicit_VR
    for ts in AllTransferSyntaxes
    if ts.is_little_endian and ts != DeflatedExplicitVRLittleEndian
}
_HEADER_READ = 16384  # bytes per read while walking: RSNA headers are ≈ 1.2 kB


class _Elements(dict[int, RawDataElement]):
    """The raw elements `_read_header` reads, by tag, with the one Dataset method it uses."""

    def get_item(self, tag: int, keep_deferred: bool = True) -> RawDataElement | None:
        return self.get(tag)


def _walk_header(f: BinaryIO, size: int, meta_end: int) -> tuple[_Elements, _Elements, int] | None:
    """(file meta elements, dataset elements, offset of the Pixel Data tag) as pydicom would read them
    with `stop_before_pixels=True`, or None to let pydicom read the file."""
    unpack_tag, unpack_u16, unpack_u32 = _U16_PAIR.unpack_from, _U16.unpack_from, _U32.unpack_from
    base, buf = 0, b""

    def window(pos: int, n: int) -> bool:
        """Make `buf` (which starts at file offset `base`) cover [pos, pos + n) when the file does."""
        nonlocal base, buf
        if base <= pos and pos + n <= base + len(buf):
            return True
        if pos + n > size:
            return False
        f.seek(pos)
        base, buf = pos, f.read(max(n, _HEADER_READ))
        return pos + n <= base + len(buf)

    meta, data = _Elements(), _Elements()
    pos, explicit, first = 132, True, True
    while True:
        if pos + 12 > base + len(buf) and not window(pos, 8):  # (the buffer never starts past pos)
            return None  # the file ends here or inside an element header: pydicom's messages
        at = pos - base
        group, elem = unpack_tag(buf, at)
        tag = group << 16 | elem
        in_meta = pos < meta_end
        if in_meta != (group == 2):
            return None  # the group length and the elements disagree; pydicom decides
        if not in_meta and first:
            first = False
            if pos != meta_end:
                return None  # the last file meta element runs past the group length
            if group == 0 or group == 0xFFFE:
                return None  # a command set or a delimiter first: pydicom's special cases
            ts = meta.get(_TRANSFER_SYNTAX)
            if ts is None or not isinstance(ts.value, bytes):
                return None
            syntax = _DATASET_EXPLICIT.get(ts.value.rstrip(b"\x00 "))
            if syntax is None:
                return None
            explicit = syntax
            vr_bytes = buf[at + 4 : at + 6]
            if explicit != (0x40 < vr_bytes[0] < 0x5B and 0x40 < vr_bytes[1] < 0x5B):
                return None  # pydicom would switch between implicit and explicit VR, with a warning
        if group == 0xFFFE:
            return None  # items and delimiters outside a sequence
        vr: str | None
        if explicit:
            vr_bytes = buf[at + 4 : at + 6]
            if vr_bytes not in _VR_KNOWN:
                return None
            vr = vr_bytes.decode("ascii")
            if vr_bytes in _VR_LONG:
                if not window(pos, 12):
                    return None
                at = pos - base
                length = unpack_u32(buf, at + 8)[0]
                header = 12
            else:
                length = unpack_u16(buf, at + 6)[0]
                header = 8
        else:
            vr = None
            length = unpack_u32(buf, at + 4)[0]
            header = 8
        if not in_meta and tag in _PIXEL_TAGS:
            return meta, data, pos  # pydicom stops here too, once it has read the element's header
        if length == _UNDEFINED_LENGTH:
            return None  # a sequence or value of undefined length: pydicom parses it
        value_at = pos + header
        end = value_at + length
        if end > size:
            return None  # runs past the end of the file: pydicom's truncation messages
        if tag == _SPECIFIC_CHARACTER_SET and not in_meta:
            # pydicom decodes this one while it reads and fails (or warns) on odd values: leave those to it
            if vr not in (None, "CS") or (end > base + len(buf) and not window(value_at, length)):
                return None
            terms = buf[value_at - base : end - base].split(b"\\")
            if not all(t.rstrip(b" \x00") in _CHARSETS for t in terms):
                return None
        if in_meta and vr != "UI" and tag in _WANTED:
            return None  # pydicom converts these two by their VR: a UID of another VR is its business
        if tag in _WANTED:
            if end > base + len(buf) and not window(value_at, length):
                return None
            value = buf[value_at - base : end - base] if length else b""
            (meta if in_meta else data)[tag] = RawDataElement(
                BaseTag(tag), vr, length, value, value_at, not explicit, True
            )
        pos = end
        if pos >= size:
            return None  # no Pixel Data: pydicom tells what is missing


def _read_header(path: str | os.PathLike[str], f: BinaryIO, size: int) -> tuple[SliceMeta, _PixelLayout]:
    """Parse and check the header of the open file `f` (`size` bytes); leave `f` anywhere."""
    if size == 0:
        raise _fail(path, "empty", "file is empty (0 bytes)")
    head = f.read(132)
    if len(head) < 132:
        raise _fail(path, "not_dicom", f"file is {size:,} bytes, shorter than the 132-byte DICOM preamble")
    if head[128:] != b"DICM":
        raise _fail(
            path, "not_dicom", f"no DICOM preamble: b'DICM' expected at byte 128, found {head[128:]!r}"
        )
    # (0002,0000) File Meta Information Group Length, when written first as the standard asks.
    if size < 144:
        raise _fail(path, "truncated", f"file ends inside the file meta group at {size:,} bytes")
    meta_end = None
    group_length = f.read(12)
    if len(group_length) == 12 and group_length[:6] == b"\x02\x00\x00\x00UL":
        meta_end = 144 + struct.unpack("<I", group_length[8:12])[0]
    if meta_end is not None and size < meta_end:
        raise _fail(
            path,
            "truncated",
            f"file ends inside the file meta group at {size:,} bytes, {meta_end:,} expected",
        )
    walked = None
    if meta_end is not None and group_length[6:8] == b"\x04\x00" and _FAST_HEADER:
        walked = _walk_header(f, size, meta_end)
    ds: _Header
    meta_ds: _Header
    if walked is not None:
        meta_ds, ds, stop = walked
    else:
        f.seek(0)
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except (EOFError, struct.error) as e:
            raise _fail(path, "truncated", f"file ends inside the header at {size:,} bytes ({e})") from None
        except Exception as e:
            raise _fail(path, "not_dicom", f"DICOM header cannot be parsed: {e}") from None
        stop = f.tell()
        meta_ds = getattr(ds, "file_meta", None) or Dataset()
    ts_text = _text(meta_ds, _TRANSFER_SYNTAX)
    if ts_text is None:
        raise _fail(path, "not_dicom", "no (0002,0010) Transfer Syntax UID in the file meta group")
    ts = UID(ts_text)

    # Where did pydicom stop? At the Pixel Data tag, or at the end of the file. (A deflated dataset
    # is one zlib stream: file offsets say nothing, so it is read whole, once, here.)
    at_pixels = False
    inline: bytes | None = None
    if ts == DeflatedExplicitVRLittleEndian:
        f.seek(0)
        try:
            pixel_elem = dcmread(f).get_item(_PIXEL_DATA, keep_deferred=True)
        except Exception as e:
            raise _fail(path, "truncated", f"deflated dataset cannot be inflated: {e}") from None
        if pixel_elem is not None and pixel_elem.value is not None:
            at_pixels = True
            inline = bytes(pixel_elem.value)
    elif stop < size:
        f.seek(stop)
        tag_bytes = f.read(4)
        if len(tag_bytes) == 4:
            group, elem = struct.unpack("<HH" if ts != ExplicitVRBigEndian else ">HH", tag_bytes)
            at_pixels = (group << 16 | elem) in (_PIXEL_DATA, 0x7FE00008, 0x7FE00009)
    if not at_pixels and ts != DeflatedExplicitVRLittleEndian:
        end = _last_element_end(ds) if len(ds) else meta_end
        if end is not None and end > size:
            raise _fail(path, "truncated", f"file ends inside the header at {size:,} bytes, {end:,} expected")
        if end is not None and end < stop and stop == size:
            raise _fail(path, "truncated", f"file ends inside an element after byte {end:,} ({size:,} bytes)")

    sop_class = _text(meta_ds, _MEDIA_SOP_CLASS) or _text(ds, _SOP_CLASS)
    if sop_class == _DICOMDIR_SOP_CLASS:
        raise _fail(path, "not_image", "a DICOMDIR (media directory), not an image")

    modality = _text(ds, _MODALITY)
    if modality != "CT":
        found = "missing" if modality is None else repr(modality)
        raise _fail(path, "not_ct", f"{_describe(_MODALITY, 'Modality')} is {found}, 'CT' expected")

    samples = _uint(ds, _SAMPLES_PER_PIXEL)
    if samples is not None and samples != 1:
        raise _fail(
            path, "colour", f"{_describe(_SAMPLES_PER_PIXEL, 'Samples per Pixel')} is {samples}, 1 expected"
        )
    photometric = (_text(ds, _PHOTOMETRIC) or "MONOCHROME2").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _fail(
            path,
            "colour",
            f"{_describe(_PHOTOMETRIC, 'Photometric Interpretation')} is {photometric!r}, "
            "MONOCHROME1 or MONOCHROME2 expected",
        )

    image_type = [v.upper() for v in (_values(ds, _IMAGE_TYPE) or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        raise _fail(
            path,
            "localizer",
            f"{_describe(_IMAGE_TYPE, 'Image Type')} is {_joined(image_type)}: a localizer/scout",
        )

    frames = _integer(ds, _NUMBER_OF_FRAMES)
    if frames is not None and frames > 1:
        raise _fail(
            path, "multi_frame", f"{_describe(_NUMBER_OF_FRAMES, 'Number of Frames')} is {frames}, 1 expected"
        )

    image_id = _require_text(path, ds, _SOP_INSTANCE, "SOP Instance UID")
    study_uid = _require_text(path, ds, _STUDY_UID, "Study Instance UID")
    series_uid = _require_text(path, ds, _SERIES_UID, "Series Instance UID")

    position = _require_floats(path, ds, _IMAGE_POSITION, "Image Position (Patient)", 3)
    orientation = _require_floats(path, ds, _IMAGE_ORIENTATION, "Image Orientation (Patient)", 6)
    spacing = _require_floats(path, ds, _PIXEL_SPACING, "Pixel Spacing", 2)
    try:
        position_along_normal = slice_position(position, orientation)
    except ValueError as e:
        detail = f"{_describe(_IMAGE_ORIENTATION, 'Image Orientation (Patient)')}: {e}"
        raise _fail(path, "missing_geometry", detail) from None
    if min(spacing) <= 0:
        raise _fail(
            path,
            "missing_geometry",
            f"{_describe(_PIXEL_SPACING, 'Pixel Spacing')} is {spacing[0]:g}\\{spacing[1]:g}, positive expected",
        )

    number = _integer(ds, _INSTANCE_NUMBER)

    # Transfer syntax: native, or compressed with a decoder installed.
    if ts not in _NATIVE:
        if not ts.is_transfer_syntax:
            raise _fail(
                path,
                "unsupported_transfer_syntax",
                f"(0002,0010) Transfer Syntax UID {ts} is not a known transfer syntax",
            )
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise _fail(
                path,
                "unsupported_transfer_syntax",
                f"transfer syntax {ts} ({ts.name}) has no pixel data decoder",
            ) from None
        if not decoder.is_available:
            raise _fail(
                path,
                "unsupported_transfer_syntax",
                f"transfer syntax {ts} ({ts.name}): no decoder plugin installed "
                f"(missing: {', '.join(sorted(decoder.missing_dependencies)) or 'a plugin'})",
            )
    encapsulated = ts not in _NATIVE

    rows = _require_positive(path, ds, _ROWS, "Rows")
    cols = _require_positive(path, ds, _COLUMNS, "Columns")
    bits_allocated = _require_positive(path, ds, _BITS_ALLOCATED, "Bits Allocated")
    bits_stored = _uint(ds, _BITS_STORED)
    pixel_representation = _uint(ds, _PIXEL_REPRESENTATION)
    if bits_allocated not in (8, 16, 32):
        raise _fail(
            path,
            "undecodable",
            f"{_describe(_BITS_ALLOCATED, 'Bits Allocated')} is {bits_allocated}, 8, 16 or 32 expected",
        )
    bits_stored = bits_stored or bits_allocated
    if bits_stored > bits_allocated:
        raise _fail(
            path,
            "undecodable",
            f"{_describe(_BITS_STORED, 'Bits Stored')} is {bits_stored}, more than Bits Allocated {bits_allocated}",
        )
    signed = pixel_representation == 1

    intercept_values = _floats(ds, _RESCALE_INTERCEPT)
    slope_values = _floats(ds, _RESCALE_SLOPE)
    intercept = intercept_values[0] if intercept_values else 0.0
    slope = slope_values[0] if slope_values else 1.0
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise _fail(
            path,
            "undecodable",
            f"(0028,1053) Rescale Slope {slope:g} / (0028,1052) Rescale Intercept {intercept:g}: finite, non-zero slope expected",
        )
    rsna_12bit = bits_stored == 12 and not signed and intercept > -100
    table_key = ("dicom", bits_allocated, bits_stored, signed, slope, intercept, rsna_12bit)

    # The Pixel Data element: present, complete, and (uncompressed) of the size the header declares.
    if not at_pixels:
        raise _fail(path, "no_pixel_data", "no (7FE0,0010) Pixel Data element")
    expected = rows * cols * bits_allocated // 8
    big_endian = ts == ExplicitVRBigEndian
    if inline is not None:
        length, value_offset = len(inline), -1
    else:
        length, value_offset = _pixel_element(path, f, stop, ts, size)

    if encapsulated:
        if rows > _MAX_COMPRESSED_SIDE or cols > _MAX_COMPRESSED_SIDE:
            raise _fail(
                path,
                "size_mismatch",
                f"Rows×Columns {rows:,}×{cols:,} is larger than {_MAX_COMPRESSED_SIDE:,}×{_MAX_COMPRESSED_SIDE:,}, "
                "the largest compressed CT slice read",
            )
        if length != _UNDEFINED_LENGTH:
            raise _fail(
                path,
                "undecodable",
                f"compressed pixel data ({ts.name}) is not encapsulated (length {length:,})",
            )
        value_length = _scan_fragments(path, f, value_offset, size)
    else:
        if length == _UNDEFINED_LENGTH:
            raise _fail(
                path, "undecodable", f"encapsulated pixel data in an uncompressed transfer syntax ({ts.name})"
            )
        if length < expected:
            raise _fail(
                path,
                "size_mismatch",
                f"pixel data is {length:,} bytes, {expected:,} expected for {rows}×{cols}×{bits_allocated} bit",
            )
        if inline is None and value_offset + expected > size:
            raise _fail(
                path,
                "truncated",
                f"file ends at {size:,} bytes, inside the pixel data ({value_offset + expected:,} bytes expected)",
            )
        value_length = expected

    meta = SliceMeta(
        image_id=image_id,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=_text(ds, _PATIENT_ID) or "",
        slice_position=position_along_normal,
        instance_number=number,
        pixel_spacing=(spacing[0], spacing[1]),
        rows=rows,
        cols=cols,
    )
    layout = _PixelLayout(
        transfer_syntax=ts,
        encapsulated=encapsulated,
        big_endian=big_endian,
        rows=rows,
        cols=cols,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=signed,
        photometric=photometric,
        value_offset=value_offset,
        value_length=value_length,
        table_key=table_key,
        inline=inline,
        element_offset=stop if inline is None else -1,
        file_size=size,
    )
    return meta, layout


def _pixel_element(
    path: str | os.PathLike[str], f: BinaryIO, stop: int, ts: UID, size: int
) -> tuple[int, int]:
    """Read the Pixel Data element header at `stop`: (value length, file offset of the value)."""
    f.seek(stop)
    big_endian = ts == ExplicitVRBigEndian
    implicit = ts == ImplicitVRLittleEndian
    order = ">" if big_endian else "<"
    header = f.read(8 if implicit else 12)
    if len(header) < 8:
        raise _fail(path, "truncated", f"file ends inside the Pixel Data element header at {size:,} bytes")
    group, elem = struct.unpack(order + "HH", header[:4])
    if (group << 16 | elem) != _PIXEL_DATA:
        raise _fail(
            path, "no_pixel_data", f"({group:04X},{elem:04X}) float pixel data, not (7FE0,0010) Pixel Data"
        )
    if implicit:
        return struct.unpack(order + "I", header[4:8])[0], stop + 8
    if header[4:6] in (b"OB", b"OW", b"UN", b"OV", b"OF", b"OD", b"OL"):
        if len(header) < 12:
            raise _fail(
                path, "truncated", f"file ends inside the Pixel Data element header at {size:,} bytes"
            )
        return struct.unpack(order + "I", header[8:12])[0], stop + 12
    return struct.unpack(order + "H", header[6:8])[0], stop + 8


def _scan_fragments(path: str | os.PathLike[str], f: BinaryIO, offset: int, size: int) -> int:
    """Walk the items of encapsulated pixel data from `offset`; return the bytes up to and including
    the sequence delimiter. Reads only the 8-byte item headers."""
    pos = offset
    n_items = 0
    while True:
        f.seek(pos)
        item = f.read(8)
        if len(item) < 8:
            raise _fail(path, "truncated", f"file ends at {size:,} bytes, inside the compressed pixel data")
        group, elem, length = struct.unpack("<HHI", item)
        tag = group << 16 | elem
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == _UNDEFINED_LENGTH:
            raise _fail(
                path, "undecodable", f"unexpected ({group:04X},{elem:04X}) in the compressed pixel data"
            )
        pos += 8 + length
        if pos > size:
            raise _fail(
                path,
                "truncated",
                f"file ends at {size:,} bytes, inside the compressed pixel data ({pos:,} expected)",
            )
        n_items += 1
    if n_items < 2:  # the basic offset table item, then at least one fragment
        raise _fail(path, "no_pixel_data", "compressed pixel data holds no frame")
    return pos + 8 - offset


@functools.lru_cache(maxsize=64)
def _hu_of_code(table_key: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
    """HU (float64, float32) of every code (the unsigned bit pattern of a 1- or 2-byte stored value)."""
    _, bits_allocated, bits_stored, signed, slope, intercept, rsna_12bit = table_key
    codes = np.arange(1 << bits_allocated, dtype=np.int64)
    stored = _stored_from_codes(codes, bits_stored, signed)
    hu = _hu_from_stored(stored, slope, intercept, rsna_12bit)
    return hu, hu.astype(np.float32)


def _stored_from_codes(codes: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """The stored values of raw codes (int64): the low `bits_stored` bits, sign-extended if signed."""
    stored = codes.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        stored = np.where(stored >= 1 << (bits_stored - 1), stored - (1 << bits_stored), stored)
    return stored


def _hu_from_stored(stored: np.ndarray, slope: float, intercept: float, rsna_12bit: bool) -> np.ndarray:
    """DESIGN.md step 1: the RSNA 12-bit correction, then stored × slope + intercept (float64)."""
    if rsna_12bit:
        stored = stored + 1000
        stored = np.where(stored >= 4096, stored - 4096, stored)
        intercept = -1000.0
    return stored.astype(np.float64) * slope + intercept


def _open(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    f = open(path, "rb")  # noqa: SIM115 - closed by the callers' try/finally
    return f, os.fstat(f.fileno()).st_size


def read_header(path: str | os.PathLike[str]) -> SliceMeta:
    """The header of one slice, without reading its pixel data.

    Raises `SliceError` for every reason the header and the file size reveal: not DICOM, empty,
    truncated, not CT, colour, localizer, multi-frame, missing UIDs or geometry, an unsupported
    transfer syntax, no pixel data, and uncompressed pixel data shorter than Rows×Columns×Bits
    Allocated (`size_mismatch`) or cut off by the end of the file (`truncated`).
    """
    f, size = _open(path)
    try:
        meta, _ = _read_header(path, f, size)
    finally:
        f.close()
    return meta


def _codes(path: str | os.PathLike[str], f: BinaryIO, layout: _PixelLayout) -> np.ndarray:
    """The raw codes (uint8/uint16 bit patterns for 8/16-bit data, int64 stored values for 32-bit)."""
    rows, cols, bits = layout.rows, layout.cols, layout.bits_allocated
    if not layout.encapsulated:
        if layout.inline is not None:  # deflated: read with the header
            data: Any = layout.inline[: layout.value_length]
            got = len(data)
        else:
            # Into this thread's reusable buffer: a fresh 512 KiB bytes object costs page faults.
            data = _scratch("pixels", (layout.value_length,), np.uint8)
            f.seek(layout.value_offset)
            got = f.readinto(data)  # type: ignore[attr-defined]
        if got < layout.value_length:
            raise _fail(path, "truncated", f"pixel data ends after {got:,} of {layout.value_length:,} bytes")
        dtype = np.dtype(f"u{bits // 8}").newbyteorder(">" if layout.big_endian else "<")
        codes = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
        if layout.big_endian and bits > 8:
            codes = codes.astype(dtype.newbyteorder("="))
    else:
        f.seek(layout.value_offset)
        data = f.read(layout.value_length)
        decoder = get_decoder(layout.transfer_syntax)
        # The header facts are passed in, so pydicom neither re-parses nor converts any element.
        options: dict[str, Any] = {
            "rows": rows,
            "columns": cols,
            "samples_per_pixel": 1,
            "bits_allocated": bits,
            "bits_stored": layout.bits_stored,
            "pixel_representation": int(layout.signed),
            "photometric_interpretation": layout.photometric,
            "number_of_frames": 1,
        }
        try:
            arr, _ = decoder.as_array(data, **options)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # Rust decoders (pylibjpeg-rle) panic with a BaseException
            reason = " ".join(str(e).split())  # pydicom lists each plugin's failure on its own line
            raise _fail(
                path, "undecodable", f"{layout.transfer_syntax.name} pixel data cannot be decoded: {reason}"
            ) from None
        if arr.shape != (rows, cols):
            raise _fail(
                path, "undecodable", f"decoded pixel data has shape {arr.shape}, ({rows}, {cols}) expected"
            )
        codes = arr.view(f"u{arr.dtype.itemsize}") if arr.dtype.itemsize <= 2 else arr
    if bits == 32:
        return _stored_from_codes(codes.astype(np.int64), layout.bits_stored, layout.signed)
    return codes


def _read(path: str | os.PathLike[str]) -> tuple[np.ndarray, SliceMeta, _PixelLayout]:
    f, size = _open(path)
    try:
        meta, layout = _read_header(path, f, size)
        codes = _codes(path, f, layout)
    finally:
        f.close()
    return codes, meta, layout


def read_slice(path: str | os.PathLike[str]) -> tuple[np.ndarray, SliceMeta]:
    """HU as float32 (rows, cols) and the `SliceMeta` of one CT slice (DESIGN.md step 1).

    Raises `SliceError` when the file is not a usable slice (see `REASONS`).
    """
    codes, meta, layout = _read(path)
    if layout.bits_allocated == 32:
        _, _, _, _, slope, intercept, rsna_12bit = layout.table_key
        return _hu_from_stored(codes, slope, intercept, rsna_12bit).astype(np.float32), meta
    _, hu32 = _hu_of_code(layout.table_key)
    return hu32[codes], meta


def read_rendered(path: str | os.PathLike[str], size: int = 256) -> tuple[np.ndarray, SliceMeta]:
    """The three windows of one CT slice as uint8 (3, size, size), and its `SliceMeta`.

    Equal within ±1 to `window_hu(read_slice(path)[0], size)`, computed from the stored values through
    a cached lookup table (the fast path used by conversion and prediction). Raises `SliceError`.
    """
    codes, meta, layout = _read(path)
    return _render(codes, layout.table_key, size), meta


def _render(
    codes: np.ndarray, table_key: tuple[Any, ...], size: int, out: np.ndarray | None = None
) -> np.ndarray:
    if table_key[1] == 32:
        _, _, _, _, slope, intercept, rsna_12bit = table_key
        result = window_hu(_hu_from_stored(codes, slope, intercept, rsna_12bit), size)
        if out is None:
            return result
        out[...] = result
        return out
    hu64, _ = _hu_of_code(table_key)
    return _render_table_codes(codes, hu64, table_key, size, out)


# --------------------------------------------------------------------------- the scan's pixel layout
#
# The conversion reads every header twice: once in the scan (for the plan) and once more in the shard
# task, only to find the pixel data again (≈ 0.26 ms of pydicom per slice, a quarter of the task's
# work). `read_header_layout` returns, with the header, a short text that says where the pixel data
# lies and how to decode it; the scan keeps it in the manifest and the shard task hands it back to
# `read_rendered_layout`, which reads the pixels with one positioned read and renders them.

_LAYOUT_FORMAT = "ichpx1"


def _layout_text(layout: _PixelLayout, mtime_ns: int) -> str:
    """`layout` as text (see `read_header_layout`); "" where only the full reader applies: compressed,
    deflated or 32-bit pixel data."""
    if (
        layout.encapsulated
        or layout.inline is not None
        or layout.element_offset < 0
        or layout.bits_allocated == 32
    ):
        return ""
    _, bits_allocated, bits_stored, signed, slope, intercept, rsna_12bit = layout.table_key
    fields = (
        _LAYOUT_FORMAT,
        layout.file_size,
        mtime_ns,
        layout.element_offset,
        layout.value_offset,
        layout.value_length,
        layout.rows,
        layout.cols,
        bits_allocated,
        bits_stored,
        int(signed),
        int(layout.big_endian),
        repr(float(slope)),  # repr round-trips a float exactly
        repr(float(intercept)),
        int(rsna_12bit),
    )
    return ";".join(str(f) for f in fields)


@functools.lru_cache(maxsize=256)
def _parse_layout(text: str) -> tuple[int, int, int, int, int, int, int, bool, tuple[Any, ...]] | None:
    """(file size, modification time, element offset, value offset, value length, rows, cols, big
    endian, table key), or None when `text` is not a layout of this version."""
    parts = text.split(";")
    if len(parts) != 15 or parts[0] != _LAYOUT_FORMAT:
        return None
    try:
        size, mtime, element, offset, length, rows, cols, ba, bs, signed, big = (int(v) for v in parts[1:12])
        slope, intercept, fix = float(parts[12]), float(parts[13]), int(parts[14])
    except ValueError:
        return None
    if ba not in (8, 16) or not 0 <= element < offset or length != rows * cols * ba // 8:
        return None
    return (
        size,
        mtime,
        element,
        offset,
        length,
        rows,
        cols,
        bool(big),
        ("dicom", ba, bs, bool(signed), slope, intercept, bool(fix)),
    )


def _read_at(raw: Any, buf: np.ndarray, offset: int) -> int:
    """Fill `buf` from byte `offset` of the unbuffered file `raw`: one positioned read where the system
    has `preadv` (Linux, the BSDs), else seek + read. Returns the bytes read (less at the end of file)."""
    view = memoryview(cast(Any, buf)).cast("B")  # ndarray is a buffer; numpy stubs say otherwise
    got = 0
    while got < len(view):
        if _HAS_PREADV:
            n = os.preadv(raw.fileno(), [view[got:]], offset + got)
        else:
            raw.seek(offset + got)
            n = raw.readinto(view[got:])
        if not n:
            break
        got += n
    return got


_HAS_PREADV = hasattr(os, "preadv")


def read_header_layout(path: str | os.PathLike[str]) -> tuple[SliceMeta, str]:
    """`read_header(path)`, and the layout of its pixel data as a short text for `read_rendered_layout`.

    The text (file size and modification time, offsets of the (7FE0,0010) Pixel Data element and of its value, Rows,
    Columns, Bits Allocated/Stored, Pixel Representation, byte order, `(0028,1053) Rescale Slope`,
    `(0028,1052) Rescale Intercept` and whether the RSNA 12-bit correction applies) is "" for pixel data
    that only the full reader decodes (compressed, deflated, 32-bit). It is what the conversion's scan
    keeps in the manifest, so that the shard tasks do not parse every header a second time.
    """
    f = open(path, "rb")  # noqa: SIM115 - closed below
    try:
        st = os.fstat(f.fileno())
        meta, layout = _read_header(path, f, st.st_size)
    finally:
        f.close()
    return meta, _layout_text(layout, st.st_mtime_ns)


def read_rendered_layout(
    path: str | os.PathLike[str], layout: str | None, size: int = 256, out: np.ndarray | None = None
) -> np.ndarray:
    """`read_rendered(path, size)[0]` (the same pixels) for a file whose header an earlier
    `read_header_layout` read: one positioned read of the pixel data, no header parse.

    `out`, a uint8 (3, size, size) array, receives the result when given (a row of a shard block).
    The layout is trusted only while the file still has the size and modification time it had and
    still holds the Pixel Data element where it was; otherwise (or for an empty or unknown `layout`) the full reader runs,
    with its checks, and raises `SliceError` as `read_rendered` does.
    """
    parsed = _parse_layout(layout) if layout else None
    if parsed is not None:
        file_size, mtime_ns, element, offset, length, rows, cols, big_endian, table_key = parsed
        buf = _scratch("pixels", (offset - element + length,), np.uint8)
        with open(path, "rb", buffering=0) as raw:
            st = os.fstat(raw.fileno())
            same = (st.st_size, st.st_mtime_ns) == (file_size, mtime_ns)
            same = same and _read_at(raw, buf, element) == len(buf)
        tag = bytes(buf[:4])
        if same and tag == (b"\x7f\xe0\x00\x10" if big_endian else b"\xe0\x7f\x10\x00"):
            dtype = np.dtype(f"u{table_key[1] // 8}").newbyteorder(">" if big_endian else "<")
            codes = buf[offset - element :].view(dtype).reshape(rows, cols)
            if big_endian and table_key[1] > 8:
                codes = codes.astype(dtype.newbyteorder("="))
            return _render(codes, table_key, _check_size(size), out)
    rendered, _ = read_rendered(path, size)
    if out is None:
        return rendered
    out[...] = rendered
    return out
