"""The public readers: a file's header (`read_header`), its HU (`read_slice`), its windows (`read_rendered`).

Each opens the file once and shares one header pass (`header.py`); a file that is not a usable slice
raises `SliceError`. DICOM is recognised by content (`is_dicom`: the preamble and `DICM`), never by
file name.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np

from ichdata.dicom.header import parse_header
from ichdata.dicom.hu import hu_from_stored, hu_of_code
from ichdata.dicom.identity import FileIdentity, check_header, check_stat, read_header_crc32
from ichdata.dicom.meta import PixelLayout, SliceMeta
from ichdata.dicom.pixels import read_codes, render

__all__ = ["is_dicom", "read_header", "read_rendered", "read_slice"]


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


def _open(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    f = open(path, "rb")  # noqa: SIM115 - closed by the callers' try/finally
    return f, os.fstat(f.fileno()).st_size


def read_header(path: str | os.PathLike[str]) -> SliceMeta:
    """The header of one slice, without reading its pixel data.

    Raises:
        SliceError: for every reason the header and the file size reveal: not DICOM, empty, truncated,
            not CT, colour, localizer, multi-frame, missing UIDs or geometry, an unsupported transfer
            syntax, no pixel data, and uncompressed pixel data shorter than Rows×Columns×Bits
            Allocated (`size_mismatch`) or cut off by the end of the file (`truncated`).
    """
    f, size = _open(path)
    try:
        meta, _ = parse_header(path, f, size)
    finally:
        f.close()
    return meta


def _read(
    path: str | os.PathLike[str], expect: FileIdentity | None = None
) -> tuple[np.ndarray, SliceMeta, PixelLayout]:
    f, size = _open(path)
    try:
        if expect is not None:
            check_stat(path, expect, os.fstat(f.fileno()))
        meta, layout = parse_header(path, f, size)
        if expect is not None and expect.header_crc32 is not None:
            check_header(path, expect, read_header_crc32(f.fileno(), layout.element_offset))
        codes = read_codes(path, f, layout)
    finally:
        f.close()
    return codes, meta, layout


def read_slice(path: str | os.PathLike[str]) -> tuple[np.ndarray, SliceMeta]:
    """HU as float32 (rows, cols) and the `SliceMeta` of one CT slice (DESIGN.md step 1).

    Raises:
        SliceError: when the file is not a usable slice (see `ichdata.reasons.READER_REASONS`).
    """
    codes, meta, layout = _read(path)
    key = layout.hu_key
    if key.bits_allocated == 32:
        return hu_from_stored(codes, key.slope, key.intercept, key.rsna_12bit).astype(np.float32), meta
    _, hu32 = hu_of_code(key)
    return hu32[codes], meta


def read_rendered(
    path: str | os.PathLike[str], size: int = 256, *, expect: FileIdentity | None = None
) -> tuple[np.ndarray, SliceMeta]:
    """The three windows of one CT slice as uint8 (3, size, size), and its `SliceMeta`.

    Equal within ±1 to `window_hu(read_slice(path)[0], size)`: the stored values index a cached table
    that folds the unused-bit masking, the RSNA 12-bit correction, slope, intercept and the three
    windows, so the HU image is never built (the fast path of conversion and prediction).

    Raises:
        SliceError: as `read_slice` does; `changed_during_conversion` when `expect` (what a scan saw of
            the file) is given and the file is no longer that one.
    """
    codes, meta, layout = _read(path, expect)
    return render(codes, layout.hu_key, size), meta
