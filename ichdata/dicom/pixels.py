"""Pixel data → codes → rendered windows, for a slice whose header `header.py` has checked.

`read_codes` reads native pixel data straight into this thread's scratch buffer and decodes
compressed data with pydicom's decoders, handing them the header facts so that pydicom neither
re-parses nor converts any element. `render` maps codes through the HU table of their `HuKey` and
the windows of `ichdata.windows` (32-bit data goes through HU, having no code table).
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

import numpy as np
from pydicom.pixels import get_decoder

from ichdata.dicom.hu import HuKey, hu_from_stored, hu_of_code, stored_from_codes
from ichdata.dicom.meta import PixelLayout, SliceError
from ichdata.reasons import Reason
from ichdata.windows import _render_table_codes, _scratch, window_hu

__all__ = ["read_codes", "render"]


def read_codes(path: str | os.PathLike[str], f: BinaryIO, layout: PixelLayout) -> np.ndarray:
    """The raw codes (uint8/uint16 bit patterns for 8/16-bit data, int64 stored values for 32-bit).

    Raises:
        SliceError: `truncated` when the pixel data ends early, `undecodable` when the decoder fails.
    """
    rows, cols, bits = layout.rows, layout.cols, layout.bits_allocated
    if not layout.encapsulated:
        data: bytes | np.ndarray
        if layout.inline is not None:  # deflated: read with the header
            data = layout.inline[: layout.value_length]
            got = len(data)
        else:
            # Into this thread's reusable buffer: a fresh buffer per slice costs page faults.
            data = _scratch("pixels", (layout.value_length,), np.uint8)
            f.seek(layout.value_offset)
            got = f.readinto(data)  # type: ignore[attr-defined]
        if got < layout.value_length:
            raise SliceError(
                path, Reason.TRUNCATED, f"pixel data ends after {got:,} of {layout.value_length:,} bytes"
            )
        dtype = np.dtype(f"u{bits // 8}").newbyteorder(">" if layout.big_endian else "<")
        codes = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
        if layout.big_endian and bits > 8:
            codes = codes.astype(dtype.newbyteorder("="))
    else:
        codes = _decode(path, f, layout)
    if bits == 32:
        return stored_from_codes(codes.astype(np.int64), layout.bits_stored, layout.signed)
    return codes


def _decode(path: str | os.PathLike[str], f: BinaryIO, layout: PixelLayout) -> np.ndarray:
    """The codes of encapsulated (compressed) pixel data, through pydicom's decoder."""
    rows, cols = layout.rows, layout.cols
    f.seek(layout.value_offset)
    data = f.read(layout.value_length)
    decoder = get_decoder(layout.transfer_syntax)
    # pydicom annotates these keywords as `**kwargs: DecodeOptions` (each one a whole options dict),
    # so they go through an untyped dict.
    options: dict[str, Any] = {
        "rows": rows,
        "columns": cols,
        "samples_per_pixel": 1,
        "bits_allocated": layout.bits_allocated,
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
        raise SliceError(
            path,
            Reason.UNDECODABLE,
            f"{layout.transfer_syntax.name} pixel data cannot be decoded: {reason}",
        ) from None
    if arr.shape != (rows, cols):
        raise SliceError(
            path, Reason.UNDECODABLE, f"decoded pixel data has shape {arr.shape}, ({rows}, {cols}) expected"
        )
    return arr.view(f"u{arr.dtype.itemsize}") if arr.dtype.itemsize <= 2 else arr


def render(codes: np.ndarray, key: HuKey, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """The three windows of `codes` (from `read_codes`) as uint8 (3, size, size), into `out` if given."""
    if key.bits_allocated == 32:
        result = window_hu(hu_from_stored(codes, key.slope, key.intercept, key.rsna_12bit), size)
        if out is None:
            return result
        out[...] = result
        return out
    hu64, _ = hu_of_code(key)
    return _render_table_codes(codes, hu64, key, size, out)
