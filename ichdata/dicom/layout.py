"""The pixel layout as text: the conversion's scan reads each header once, its shard tasks reuse it.

`read_header_layout` returns, with the header, a short text (format `ichpx1`) saying where the pixel
data lies and how to decode it; the scan keeps it in the manifest and the shard task hands it back to
`read_rendered_layout`, which renders with one positioned read and no second header parse. The text
is trusted only while the file keeps its size, modification time and Pixel Data tag; otherwise the
full reader runs, with its checks (or, when the caller says what the scan saw, `expect=`, a changed
file is refused: `ichdata.dicom.identity`).
"""

from __future__ import annotations

import functools
import io
import os
from typing import NamedTuple

import numpy as np

from ichdata.dicom.header import MAX_SIDE, parse_header
from ichdata.dicom.hu import HuKey
from ichdata.dicom.identity import FileIdentity, check_header, check_stat, header_crc32, read_header_crc32
from ichdata.dicom.meta import PixelLayout, SliceMeta
from ichdata.dicom.pixels import render
from ichdata.dicom.read import read_rendered
from ichdata.windows import _check_size, _scratch

__all__ = ["read_header_layout", "read_rendered_layout"]

_LAYOUT_FORMAT = "ichpx1"
_HAS_PREADV = hasattr(os, "preadv")


class _Layout(NamedTuple):
    """A parsed layout text."""

    file_size: int
    mtime_ns: int
    element_offset: int  # the (7FE0,0010) Pixel Data tag
    value_offset: int  # its value
    value_length: int
    rows: int
    cols: int
    big_endian: bool
    hu_key: HuKey


def _layout_text(layout: PixelLayout, mtime_ns: int) -> str:
    """`layout` as text (see `read_header_layout`).

    "" where only the full reader applies: compressed, deflated or 32-bit pixel data.
    """
    if (
        layout.encapsulated
        or layout.inline is not None
        or layout.element_offset < 0
        or layout.bits_allocated == 32
    ):
        return ""
    key = layout.hu_key
    fields = (
        _LAYOUT_FORMAT,
        layout.file_size,
        mtime_ns,
        layout.element_offset,
        layout.value_offset,
        layout.value_length,
        layout.rows,
        layout.cols,
        key.bits_allocated,
        key.bits_stored,
        int(key.signed),
        int(layout.big_endian),
        repr(float(key.slope)),  # repr round-trips a float exactly
        repr(float(key.intercept)),
        int(key.rsna_12bit),
    )
    return ";".join(str(f) for f in fields)


@functools.lru_cache(maxsize=256)
def _parse_layout(text: str) -> _Layout | None:
    """The layout in `text`, or None when `text` is not a layout of this version."""
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
    if rows > MAX_SIDE or cols > MAX_SIDE:  # from a scan without the cap: the full reader refuses it
        return None
    key = HuKey(ba, bs, bool(signed), slope, intercept, bool(fix))
    return _Layout(size, mtime, element, offset, length, rows, cols, bool(big), key)


def _read_at(raw: io.FileIO, buf: np.ndarray, offset: int) -> int:
    """Fill `buf` from byte `offset` of the unbuffered file `raw`; return the bytes read.

    One positioned read where the system has `preadv` (Linux, the BSDs), else seek + read; fewer bytes
    than `buf` holds at the end of the file.
    """
    view = buf.data.cast("B")
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


def read_header_layout(path: str | os.PathLike[str]) -> tuple[SliceMeta, str, int | None]:
    """`read_header(path)`, its pixel layout as text, and the CRC-32 of its header bytes.

    The layout is a short text for `read_rendered_layout`; the CRC-32 (`ichdata.dicom.identity`; None
    for a deflated file) lets the conversion recognise the file when it reads the pixels. The text holds the file's size and modification time, the offsets of the (7FE0,0010) Pixel Data
    element and of its value, Rows, Columns, Bits Allocated/Stored, Pixel Representation, the byte
    order, `(0028,1053) Rescale Slope`, `(0028,1052) Rescale Intercept` and whether the RSNA 12-bit
    correction applies. It is "" for pixel data that only the full reader decodes (compressed,
    deflated, 32-bit).

    Raises:
        SliceError: as `read_header` does.
    """
    f = open(path, "rb")  # noqa: SIM115 - closed below
    try:
        st = os.fstat(f.fileno())
        meta, layout = parse_header(path, f, st.st_size)
        crc = read_header_crc32(f.fileno(), layout.element_offset)
    finally:
        f.close()
    return meta, _layout_text(layout, st.st_mtime_ns), crc


def read_rendered_layout(
    path: str | os.PathLike[str],
    layout: str | None,
    size: int = 256,
    out: np.ndarray | None = None,
    *,
    expect: FileIdentity | None = None,
) -> np.ndarray:
    """`read_rendered(path, size)[0]` (the same pixels) for a file an earlier `read_header_layout` read.

    Args:
        path: the DICOM file.
        layout: the text `read_header_layout` returned for it; "" or None runs the full reader.
        size: the side of the rendered windows.
        out: a uint8 (3, size, size) array to receive the result (a row of a shard block).
        expect: what the scan saw of the file. Given, a file that is no longer that one is refused
            (its header bytes are read with the pixels, in the same positioned read); without it, a
            changed file is read in full, as it is now.

    Returns:
        uint8 (3, size, size): `out` when given.

    Raises:
        SliceError: as `read_rendered` does, when the full reader runs; `changed_during_conversion`
            when `expect` is given and the file differs from it.
    """
    parsed = _parse_layout(layout) if layout else None
    if parsed is not None:
        element, offset = parsed.element_offset, parsed.value_offset
        start = 0 if expect is not None and expect.header_crc32 is not None else element
        buf = _scratch("pixels", (offset - start + parsed.value_length,), np.uint8)
        with open(path, "rb", buffering=0) as raw:
            st = os.fstat(raw.fileno())
            if expect is not None:
                check_stat(path, expect, st)
            same = (st.st_size, st.st_mtime_ns) == (parsed.file_size, parsed.mtime_ns)
            same = same and _read_at(raw, buf, start) == len(buf)
        if same and expect is not None and start == 0:
            check_header(path, expect, header_crc32(buf[:element].data))
        tag = bytes(buf[element - start : element - start + 4])
        big_endian = parsed.big_endian
        if same and tag == (b"\x7f\xe0\x00\x10" if big_endian else b"\xe0\x7f\x10\x00"):
            bits = parsed.hu_key.bits_allocated
            dtype = np.dtype(f"u{bits // 8}").newbyteorder(">" if big_endian else "<")
            codes = buf[offset - start :].view(dtype).reshape(parsed.rows, parsed.cols)
            if big_endian and bits > 8:
                codes = codes.astype(dtype.newbyteorder("="))
            return render(codes, parsed.hu_key, _check_size(size), out)
    rendered, _ = read_rendered(path, size, expect=expect)
    if out is None:
        return rendered
    out[...] = rendered
    return out
