"""Stored values → HU (DESIGN.md "Preprocessing" 1): the RSNA 12-bit correction, slope and intercept.

HU = stored × `(0028,1053) Rescale Slope` + `(0028,1052) Rescale Intercept`, after the RSNA 12-bit
correction: where `(0028,0101) Bits Stored` is 12, `(0028,0103) Pixel Representation` is 0 and the
intercept is above -100, add 1000 to the stored values, subtract 4096 from those ≥ 4096 and use
intercept -1000. Stored values are the low Bits Stored bits of each code, sign-extended when signed
(as pydicom does). 1- and 2-byte codes go through one cached table per `HuKey`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

__all__ = ["HuKey", "hu_from_stored", "hu_of_code", "rsna_12bit_applies", "stored_from_codes"]


class HuKey(NamedTuple):
    """The header facts that fix a slice's code → HU table; the cache key of its lookup tables."""

    bits_allocated: int  # (0028,0100) Bits Allocated
    bits_stored: int  # (0028,0101) Bits Stored
    signed: bool  # (0028,0103) Pixel Representation is 1
    slope: float  # (0028,1053) Rescale Slope
    intercept: float  # (0028,1052) Rescale Intercept
    rsna_12bit: bool  # whether the RSNA 12-bit correction applies


def rsna_12bit_applies(bits_stored: int, signed: bool, intercept: float) -> bool:
    """Whether the RSNA 12-bit correction applies to a slice with these header values."""
    return bits_stored == 12 and not signed and intercept > -100


@functools.lru_cache(maxsize=64)
def hu_of_code(key: HuKey) -> tuple[np.ndarray, np.ndarray]:
    """HU (float64, float32) of every code (the unsigned bit pattern of a 1- or 2-byte stored value)."""
    codes = np.arange(1 << key.bits_allocated, dtype=np.int64)
    stored = stored_from_codes(codes, key.bits_stored, key.signed)
    hu = hu_from_stored(stored, key.slope, key.intercept, key.rsna_12bit)
    return hu, hu.astype(np.float32)


def stored_from_codes(codes: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """The stored values of raw codes (int64): the low `bits_stored` bits, sign-extended if signed."""
    stored = codes.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        stored = np.where(stored >= 1 << (bits_stored - 1), stored - (1 << bits_stored), stored)
    return stored


def hu_from_stored(stored: np.ndarray, slope: float, intercept: float, rsna_12bit: bool) -> np.ndarray:
    """DESIGN.md step 1: the RSNA 12-bit correction, then stored × slope + intercept (float64)."""
    if rsna_12bit:
        stored = stored + 1000
        stored = np.where(stored >= 4096, stored - 4096, stored)
        intercept = -1000.0
    return stored.astype(np.float64) * slope + intercept
