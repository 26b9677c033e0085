"""CT windows: HU → three 8-bit channels (brain, subdural, bone) at 256×256, the model's input.

The contract is DESIGN.md "Preprocessing" 2-3: each window is `clip((hu - (level - width/2)) / width,
0, 1) * 255` at the native resolution, a non-square image padded to a centred square of air, each
channel area-resized to `size`×`size` (OpenCV's `INTER_AREA` for any factor) and rounded once.
`window_hu` computes it from HU; `window_stored` (and `ichdata.dicom.read_rendered`) from integer
stored values, through a cached table of each value's three levels as fixed-point fields packed in
one uint64, so one gather maps the slice and integer block sums average all three channels at once,
within ±1 of the float reference (tested). Where Numba is available the lookup and block sums run as
one compiled loop (`ichdata._kernels`) that computes the same integers.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ichdata import _kernels

__all__ = ["WINDOWS", "Window", "window_hu", "window_stored"]


class Window(NamedTuple):
    """A CT display window: `level` (centre) and `width`, in HU."""

    name: str
    level: float
    width: float


WINDOWS: tuple[Window, ...] = (
    Window("brain", 40.0, 80.0),
    Window("subdural", 80.0, 200.0),
    Window("bone", 600.0, 2800.0),
)

# Packed fixed-point channels: channel c occupies bits [21c, 21c + 21) of a uint64.
_FIELD_BITS = 21
_FIELD_MASK = np.uint64((1 << _FIELD_BITS) - 1)
# Integer block sums are exact only while a block's sum fits a field: k² · 255 · scale < 2**21.
_MAX_PACKED_BLOCK = 121


def _check_size(size: int) -> int:
    if not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def _windowed(hu: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """(3, *hu.shape) windowed levels in [0, 255], not rounded."""
    out = np.empty((len(WINDOWS), *hu.shape), dtype=dtype)
    for c, w in enumerate(WINDOWS):
        lo = w.level - w.width / 2
        np.subtract(hu, lo, out=out[c], casting="unsafe")
        np.multiply(out[c], 255.0 / w.width, out=out[c])
        np.clip(out[c], 0.0, 255.0, out=out[c])
    return out


def _pad_amounts(rows: int, cols: int) -> tuple[int, int, int]:
    """The square side and the (top, left) offsets of a centred pad; an odd remainder goes after."""
    n = max(rows, cols)
    return n, (n - rows) // 2, (n - cols) // 2


@functools.lru_cache(maxsize=64)
def _area_taps(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-resize weights from `n` to `size` samples as taps: `out[i] = Σ_t w[i,t] · x[idx[i,t]]`.

    Output sample i covers the input interval [i·n/size, (i+1)·n/size); each input sample j weighs
    its overlap with [j, j+1), divided by the interval's length, so the weights of a row sum to 1.
    Exact rational arithmetic (scaled by `size`) keeps integer factors exact.
    """
    taps = -(-n // size) + 1  # an interval of length n/size touches at most ceil(n/size) + 1 samples
    idx = np.zeros((size, taps), dtype=np.intp)
    w = np.zeros((size, taps), dtype=np.float64)
    for i in range(size):
        start, stop = i * n, (i + 1) * n  # in units of 1/size input samples
        j0 = start // size
        for t in range(taps):
            j = j0 + t
            if j >= n:
                break
            overlap = min(stop, (j + 1) * size) - max(start, j * size)
            if overlap <= 0:
                break
            idx[i, t] = j
            w[i, t] = overlap / n
    return idx, w


def _area_resize(x: np.ndarray, size: int) -> np.ndarray:
    """Area-resize the last two (equal) axes of float `x` to `size`×`size` (float32 result)."""
    n = x.shape[-1]
    if n == size:
        return x.astype(np.float32, copy=False)
    if n % size == 0:
        k = n // size
        lead = x.shape[:-2]
        return x.reshape(*lead, size, k, size, k).mean(axis=(-3, -1), dtype=np.float32)
    idx, w = _area_taps(n, size)
    w32 = w.astype(np.float32)
    rows = np.zeros((*x.shape[:-2], size, n), dtype=np.float32)
    for t in range(idx.shape[1]):
        rows += w32[:, t, None] * x[..., idx[:, t], :]
    out = np.zeros((*x.shape[:-2], size, size), dtype=np.float32)
    for t in range(idx.shape[1]):
        out += w32[:, t] * rows[..., :, idx[:, t]]
    return out


@functools.lru_cache(maxsize=64)
def _folded_taps(n: int, size: int, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`_area_taps(n, size)` for an axis of `length` samples placed at `offset` inside `n` (a centred pad).

    Taps on the padding (zeros, air) get weight 0, and indices point into the unpadded axis.
    """
    idx, w = _area_taps(n, size)
    src = idx - offset
    inside = (src >= 0) & (src < length) & (w > 0)
    return np.where(inside, src, 0).astype(np.intp), np.where(inside, w, 0.0).astype(np.float32)


def _area_resize_padded(x: np.ndarray, n: int, top: int, left: int, size: int) -> np.ndarray:
    """`_area_resize` of `x` (C, rows, cols) float32 zero-padded to (C, n, n) at (`top`, `left`).

    The padded square is never built: the pad's taps are dropped (they add 0). Returns a scratch
    (C, size, size) float32 array of this thread.
    """
    c, rows, cols = x.shape
    ridx, rw = _folded_taps(n, size, top, rows)
    cidx, cw = _folded_taps(n, size, left, cols)
    acc = _scratch("rows_acc", (c, size, cols), np.float32)
    tmp = _scratch("rows_tmp", (c, size, cols), np.float32)
    acc[...] = 0
    for t in range(ridx.shape[1]):
        np.take(x, ridx[:, t], axis=1, out=tmp, mode="clip")
        np.multiply(tmp, rw[:, t, None], out=tmp)
        np.add(acc, tmp, out=acc)
    out = _scratch("cols_acc", (c, size, size), np.float32)
    tmp2 = _scratch("cols_tmp", (c, size, size), np.float32)
    out[...] = 0
    for t in range(cidx.shape[1]):
        np.take(acc, cidx[:, t], axis=2, out=tmp2, mode="clip")
        np.multiply(tmp2, cw[:, t], out=tmp2)
        np.add(out, tmp2, out=out)
    return out


def _round_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def window_hu(hu: np.ndarray, size: int = 256) -> np.ndarray:
    """Render a 2-D HU image as uint8 (3, size, size): brain, subdural, bone (see `WINDOWS`).

    Windows are applied at the native resolution, a non-square image is padded to a centred square
    of air, each channel is area-resized to `size` and rounded once (DESIGN.md "Preprocessing").
    """
    size = _check_size(size)
    hu = np.asarray(hu)
    if hu.ndim != 2 or hu.size == 0:
        raise ValueError(f"hu must be a non-empty 2-D array, got shape {hu.shape}")
    rows, cols = hu.shape
    n, top, left = _pad_amounts(rows, cols)
    windowed = _windowed(hu)
    if (rows, cols) != (n, n):
        padded = np.zeros((len(WINDOWS), n, n), dtype=np.float32)  # air renders 0 in every window
        padded[:, top : top + rows, left : left + cols] = windowed
        windowed = padded
    return _round_u8(_area_resize(windowed, size))


def _packed_scale(k: int) -> int:
    """The largest power-of-two fixed-point scale whose k×k block sums fit one 21-bit field."""
    scale = 1
    while k * k * 255 * scale * 2 < (1 << _FIELD_BITS):
        scale *= 2
    return scale


def _packed_table(hu_of_code: np.ndarray, scale: int) -> np.ndarray:
    """uint64 table: the three windowed levels of each code, × `scale`, rounded, packed."""
    levels = _windowed(hu_of_code, dtype=np.float64)
    fixed = np.rint(levels * scale).astype(np.uint64)
    return fixed[0] | (fixed[1] << np.uint64(_FIELD_BITS)) | (fixed[2] << np.uint64(2 * _FIELD_BITS))


def _render_codes(
    codes: np.ndarray,
    hu_of_code: np.ndarray,
    size: int,
    table_key: object = None,
    out: np.ndarray | None = None,
    jit: bool = True,
) -> np.ndarray:
    """Render integer `codes` (indices into `hu_of_code`, the HU of each code) as uint8 (3, size, size).

    `table_key`, when given, is a hashable name for `hu_of_code` under which the derived tables are
    cached (reused across slices with the same header). `out`, when given, is a uint8 (3, size, size)
    array to write into (a row of a shard block) and is returned. Integer factors go through the
    compiled kernel (`ichdata._kernels`) when it is available and `jit`; the NumPy code below computes
    the same integers.
    """
    rows, cols = codes.shape
    n, top, left = _pad_amounts(rows, cols)
    if n % size or n // size > np.sqrt(_MAX_PACKED_BLOCK):
        return _render_codes_float(codes, hu_of_code, size, table_key, out, jit)

    k = n // size
    scale = _packed_scale(k)
    table = _cached(table_key, scale, lambda: _packed_table(hu_of_code, scale))
    divisor = k * k * scale
    if out is None:
        out = np.empty((len(WINDOWS), size, size), dtype=np.uint8)
    if jit and _kernels.packed_block_render(codes, table, k, top, left, divisor, out):
        return out
    # Every intermediate goes into this thread's scratch buffers: fresh multi-MB arrays cost more in
    # page faults than the arithmetic, and np.take is given intp indices because it casts uint16 ones
    # itself far more slowly than `copyto` does.
    summed = _scratch("summed", (size, size), np.uint64)
    if (rows, cols) == (n, n) and k > 1:
        # A band of input rows at a time, so that indices, packed values and row sums stay in the CPU
        # cache, which whole-image passes do not.
        band = k * max(1, _BAND_ROWS // k)
        for r0 in range(0, n, band):
            r1 = min(n, r0 + band)
            _packed_block_sums(table, codes[r0:r1], k, summed[r0 // k : r1 // k])
    else:
        idx = _scratch("idx", (rows, cols), np.intp)
        np.copyto(idx, codes, casting="unsafe")
        packed = _scratch("square", (n, n), np.uint64)
        if (rows, cols) != (n, n):
            packed[...] = 0  # air: 0 in every channel
        # Indices are in range: mode="clip" skips the copy np.take makes of `out` to check bounds.
        np.take(table, idx, out=packed[top : top + rows, left : left + cols], mode="clip")
        if k > 1:
            _block_sums(packed, k, summed)
        else:
            np.copyto(summed, packed)
    if divisor & (divisor - 1) == 0:
        # A power of two: add half the divisor to every field at once (a field's sum stays below
        # 2**21, so nothing carries into the next), shift each field down, keep its low 8 bits.
        shift = divisor.bit_length() - 1
        half = sum((divisor // 2) << (c * _FIELD_BITS) for c in range(len(WINDOWS)))
        np.add(summed, np.uint64(half), out=summed)
        for c in range(len(WINDOWS)):
            # The uint8 output keeps the low 8 bits of each shifted field.
            np.right_shift(summed, np.uint64(c * _FIELD_BITS + shift), out=out[c], casting="unsafe")
    else:
        for c in range(len(WINDOWS)):
            field = (summed >> np.uint64(c * _FIELD_BITS)) & _FIELD_MASK
            out[c] = (field + np.uint64(divisor // 2)) // np.uint64(divisor)
    return out


def _render_codes_float(
    codes: np.ndarray,
    hu_of_code: np.ndarray,
    size: int,
    table_key: object,
    out: np.ndarray | None,
    jit: bool,
) -> np.ndarray:
    """`_render_codes` for a non-integer factor (a padded 638×490, or upscaling) or a very large one.

    Float taps from float tables; a factor too large for the packed sums is a float block mean.
    """
    rows, cols = codes.shape
    n, top, left = _pad_amounts(rows, cols)
    if n % size and jit:
        if out is None:
            out = np.empty((len(WINDOWS), size, size), dtype=np.uint8)
        taps = (*_folded_taps(n, size, top, rows), *_folded_taps(n, size, left, cols))
        acc = _scratch("taps_acc", (len(WINDOWS), size, cols), np.float32)
        if _kernels.taps_render(codes, _float_table(hu_of_code, table_key), taps, acc, out):
            return out
    idx = _scratch("idx", (rows, cols), np.intp)
    np.copyto(idx, codes, casting="unsafe")
    windowed = _scratch("windowed", (len(WINDOWS), rows, cols), np.float32)
    np.take(_float_table(hu_of_code, table_key), idx, axis=1, out=windowed, mode="clip")
    if n % size == 0:  # a block mean (a factor too large for the packed sums): pad, then mean
        if (rows, cols) != (n, n):
            padded = np.zeros((len(WINDOWS), n, n), dtype=np.float32)
            padded[:, top : top + rows, left : left + cols] = windowed
            windowed = padded
        resized = _area_resize(windowed, size)
    else:
        resized = _area_resize_padded(windowed, n, top, left, size)
    if out is None:
        out = np.empty((len(WINDOWS), size, size), dtype=np.uint8)
    np.rint(resized, out=resized)
    np.clip(resized, 0, 255, out=resized)
    np.copyto(out, resized, casting="unsafe")
    return out


_BAND_ROWS = 64


def _packed_block_sums(table: np.ndarray, codes: np.ndarray, k: int, out: np.ndarray) -> None:
    """`out` = the k×k block sums of `table[codes]` (codes: a band of rows, a multiple of k)."""
    idx = _scratch("band_idx", codes.shape, np.intp)
    np.copyto(idx, codes, casting="unsafe")
    packed = _scratch("band_packed", codes.shape, np.uint64)
    np.take(table, idx, out=packed, mode="clip")
    _block_sums(packed, k, out)


def _block_sums(packed: np.ndarray, k: int, out: np.ndarray) -> None:
    """`out` (h/k, w/k) = the sums of the k×k blocks of `packed` (h, w), integer (packed fields)."""
    h, w = packed.shape
    rows = _scratch("block_rows", (h // k, w), np.uint64)
    np.add(packed[0::k], packed[1::k], out=rows)
    for r in range(2, k):
        np.add(rows, packed[r::k], out=rows)
    np.add(rows[:, 0::k], rows[:, 1::k], out=out)
    for c in range(2, k):
        np.add(out, rows[:, c::k], out=out)


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A reusable array of this thread (its contents are garbage): one per name and shape."""
    bufs: dict[tuple[str, tuple[int, ...], type], np.ndarray] | None = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    key = (name, shape, dtype)
    a = bufs.get(key)
    if a is None:
        if len(bufs) >= 32:  # many distinct image sizes: start again
            bufs.clear()
        a = bufs[key] = np.empty(shape, dtype=dtype)
    return a


# Tables per (key, kind): a handful of distinct headers in practice (RSNA has four). Plain dict
# operations are atomic, so threads share the cache safely; at worst two compute the same table.
_TABLES: dict[tuple[object, object], np.ndarray] = {}
_MAX_TABLES = 256


def _cached(key: object, kind: object, make: Callable[[], np.ndarray]) -> np.ndarray:
    if key is None:
        return make()
    table = _TABLES.get((key, kind))
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:  # a pathological stream of distinct headers: start again
            _TABLES.clear()
        table = _TABLES[(key, kind)] = make()
    return table


def _float_table(hu_of_code: np.ndarray, key: object) -> np.ndarray:
    return _cached(key, "float", lambda: _windowed(hu_of_code))


def _hu_table(dtype: np.dtype, slope: float, intercept: float) -> np.ndarray:
    """HU of every code of a 1- or 2-byte integer dtype, indexed by the code's unsigned bit pattern."""
    dtype = np.dtype(dtype)
    bits = 8 * dtype.itemsize
    codes = np.arange(1 << bits, dtype=np.dtype(f"u{dtype.itemsize}")).view(dtype.newbyteorder("="))
    return codes.astype(np.float64) * float(slope) + float(intercept)


def _render_table_codes(
    codes: np.ndarray, hu_of_code: np.ndarray, key: object, size: int = 256, out: np.ndarray | None = None
) -> np.ndarray:
    """Render `codes` (uint8/uint16 indices) through the HU table `hu_of_code`, cached under `key`.

    Into `out`, a uint8 (3, size, size) array, when given. The shared core of `window_stored` and `ichdata.dicom.read_rendered`.
    """
    size = _check_size(size)
    return _render_codes(codes, hu_of_code, size, key, out)


def window_stored(stored: np.ndarray, slope: float, intercept: float, size: int = 256) -> np.ndarray:
    """Render integer stored values as uint8 (3, size, size).

    Within ±1 of `window_hu(stored * slope + intercept, size)`. `stored` holds the values after any header correction (`ichdata.dicom` applies the RSNA 12-bit
    one); `slope` and `intercept` are `(0028,1053) Rescale Slope` and `(0028,1052) Rescale Intercept`.
    1- and 2-byte integers go through a cached lookup table; wider integers whose range spans at most
    65,536 values through a table over that range; anything else through `window_hu`.
    """
    size = _check_size(size)
    stored = np.asarray(stored)
    if stored.ndim != 2 or stored.size == 0:
        raise ValueError(f"stored must be a non-empty 2-D array, got shape {stored.shape}")
    if not np.issubdtype(stored.dtype, np.integer):
        raise ValueError(f"stored must hold integers, got {stored.dtype}")
    slope, intercept = float(slope), float(intercept)
    if stored.dtype.itemsize <= 2:
        dtype = stored.dtype.newbyteorder("=")
        codes = stored.astype(dtype, copy=False).view(f"u{dtype.itemsize}")
        key = ("stored", dtype.str, slope, intercept)
        table = _cached(key, "hu", lambda: _hu_table(dtype, slope, intercept))
        return _render_table_codes(codes, table, key, size)
    lo, hi = int(stored.min()), int(stored.max())
    if hi - lo < 1 << 16:
        codes = (stored - lo).astype(np.uint16)
        table = (np.arange(hi - lo + 1, dtype=np.float64) + lo) * slope + intercept
        return _render_codes(codes, table, size)
    return window_hu(stored.astype(np.float64) * slope + intercept, size)
