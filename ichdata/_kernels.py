"""Compiled kernels (Numba) for the hot loop of the conversion: packed table lookup + k×k block sums.

`ichdata.windows` renders a slice by looking up each stored value's three windowed levels, packed as
fixed-point fields in one uint64, and summing k×k blocks. In NumPy that is one gather and several
strided passes over multi-megabyte temporaries; here it is one compiled loop (`bench/windows.py`
measures both, the NumPy one with `ICH_NO_JIT=1`). The kernels compute exactly what the NumPy path
computes (same table, same integer sums, same rounding), so the store's pixels do not depend on which
one ran; `tests/ichdata/test_windows.py` holds them equal. Numba caches the machine code on disk
where it can (else compiles in memory); `available()` is False where Numba cannot be imported or
compiled, and `ichdata.windows` then uses NumPy; `ICH_NO_JIT=1` forces that, and
`numpy_unless_compiled()` does for a few slices, which take less time in NumPy than Numba's start.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

_FIELD_BITS = 21
_KERNELS: dict[str, Any] | None = None
_FAILED = False
_LOCK = threading.Lock()  # one compilation at a time; `warm_up` callers wait for the one in progress
_WARM = False
#: Set within `numpy_unless_compiled()` (per thread: a cluster warming up in another is unaffected).
_NO_COMPILE = contextvars.ContextVar("ich_no_compile", default=False)


def _compile(cache: bool = True) -> dict[str, Any]:
    # Long: three short kernels defined inside, so that Numba is imported only when they are compiled.
    from numba import njit

    jit = njit(cache=cache, nogil=True, boundscheck=False)

    @jit
    def square_k2(codes, table, shift, out):
        """512×512 → 256×256 (any 2n×2n → n×n) with a power-of-two divisor: the RSNA case."""
        size = out.shape[1]
        half = np.uint64((1 << shift) >> 1)
        sh = np.uint64(shift)
        f1 = np.uint64(_FIELD_BITS)
        f2 = np.uint64(2 * _FIELD_BITS)
        mask = np.uint64((1 << _FIELD_BITS) - 1)
        for i in range(size):
            r0 = codes[2 * i]
            r1 = codes[2 * i + 1]
            o0 = out[0, i]
            o1 = out[1, i]
            o2 = out[2, i]
            for j in range(size):
                s = table[r0[2 * j]] + table[r0[2 * j + 1]] + table[r1[2 * j]] + table[r1[2 * j + 1]]
                o0[j] = np.uint8(((s & mask) + half) >> sh)
                o1[j] = np.uint8((((s >> f1) & mask) + half) >> sh)
                o2[j] = np.uint8((((s >> f2) & mask) + half) >> sh)

    @jit
    def blocks(codes, table, k, top, left, divisor, out):
        """Any integer factor k, any divisor: out = (block sum of each field + divisor // 2) // divisor.

        The image is placed at (top, left) in an n×n square of air (0 in every field).
        """
        rows, cols = codes.shape
        size = out.shape[1]
        half = np.uint64(divisor // 2)
        d = np.uint64(divisor)
        f1 = np.uint64(_FIELD_BITS)
        f2 = np.uint64(2 * _FIELD_BITS)
        mask = np.uint64((1 << _FIELD_BITS) - 1)
        for i in range(size):
            for j in range(size):
                s = np.uint64(0)
                for a in range(k):
                    r = i * k + a - top
                    if r < 0 or r >= rows:
                        continue
                    for b in range(k):
                        c = j * k + b - left
                        if c < 0 or c >= cols:
                            continue
                        s += table[codes[r, c]]
                out[0, i, j] = np.uint8(((s & mask) + half) // d)
                out[1, i, j] = np.uint8((((s >> f1) & mask) + half) // d)
                out[2, i, j] = np.uint8((((s >> f2) & mask) + half) // d)

    @jit
    def taps(codes, ftable, ridx, rw, cidx, cw, acc, out):
        """A non-integer factor (a padded 638×490, say): float32 area taps, then rint, clip and uint8.

        In exactly the order and precision of `ichdata.windows._area_resize_padded` over
        `ftable[:, codes]`. `acc` is a float32 (3, size, cols) scratch array.
        """
        cols = codes.shape[1]
        size = out.shape[1]
        nr = ridx.shape[1]
        nc = cidx.shape[1]
        zero = np.float32(0.0)
        for c in range(3):
            tab = ftable[c]
            for i in range(size):
                a = acc[c, i]
                for col in range(cols):
                    a[col] = zero
                for t in range(nr):
                    w = rw[i, t]
                    src = codes[ridx[i, t]]
                    for col in range(cols):
                        a[col] = a[col] + tab[src[col]] * w
            for i in range(size):
                a = acc[c, i]
                o = out[c, i]
                for j in range(size):
                    v = zero
                    for t in range(nc):
                        v = v + a[cidx[j, t]] * cw[j, t]
                    v = np.rint(v)
                    if v < zero:
                        v = zero
                    elif v > np.float32(255.0):
                        v = np.float32(255.0)
                    o[j] = np.uint8(v)

    return {"square_k2": square_k2, "blocks": blocks, "taps": taps}


@contextlib.contextmanager
def numpy_unless_compiled() -> Iterator[None]:
    """Within the block, this thread renders with NumPy unless the kernels are compiled already.

    For a handful of slices: Numba's start in a process (its import, typing context and cached
    machine code) takes longer than NumPy's slower loop on them; the pixels are the same.
    """
    token = _NO_COMPILE.set(True)
    try:
        yield
    finally:
        _NO_COMPILE.reset(token)


def kernels() -> dict[str, Any] | None:
    """The compiled kernels, or None (no Numba, `ICH_NO_JIT=1`, or compilation failed once)."""
    global _KERNELS, _FAILED
    if _KERNELS is not None or _FAILED or _NO_COMPILE.get():
        return _KERNELS
    with _LOCK:
        if _KERNELS is not None or _FAILED:
            return _KERNELS
        if os.environ.get("ICH_NO_JIT", "") not in ("", "0"):
            _FAILED = True
            return None
        try:
            try:
                _KERNELS = _compile()
            except ImportError:
                raise
            except Exception:
                # No writable cache directory (a read-only install and home, as in some cluster
                # images): Numba refuses `cache=True`. Compile in memory instead.
                _KERNELS = _compile(cache=False)
        except Exception:  # no Numba, or one that cannot compile here: the NumPy path, same pixels
            _FAILED = True
    return _KERNELS


def _disable() -> None:
    """Stop using the kernels in this process (a kernel failed at run time; NumPy takes over)."""
    global _KERNELS, _FAILED
    _KERNELS, _FAILED = None, True


def available() -> bool:
    """Whether the compiled kernels run here (compiling them on the first call)."""
    return kernels() is not None


def packed_block_render(
    codes: np.ndarray, table: np.ndarray, k: int, top: int, left: int, divisor: int, out: np.ndarray
) -> bool:
    """Render packed codes by k×k block sums; False (nothing written) where the kernels do not apply.

    `out[c] = (k×k block sums of field c of table[codes], padded with air at (top, left)) + divisor
    // 2) // divisor`. False when the kernels are unavailable or the inputs are not what they are
    compiled for.
    """
    ks = kernels()
    if ks is None:
        return False
    if (
        codes.ndim != 2
        or codes.dtype not in (np.uint8, np.uint16)
        or table.dtype != np.uint64
        or table.shape[0] < 1 << (8 * codes.dtype.itemsize)  # every code indexes the table
        or out.dtype != np.uint8
        or out.ndim != 3
        or out.shape[0] != 3
        or out.shape[1] != out.shape[2]
        or not out.flags.c_contiguous
    ):
        return False
    rows, cols = codes.shape
    size = out.shape[1]
    if not codes.flags.c_contiguous:
        codes = np.ascontiguousarray(codes)
    try:
        if k == 2 and (rows, cols) == (2 * size, 2 * size) and divisor & (divisor - 1) == 0:
            ks["square_k2"](codes, table, divisor.bit_length() - 1, out)
        else:
            ks["blocks"](codes, table, k, top, left, divisor, out)
    except Exception:  # compilation failed at first call (an LLVM/CPU problem): NumPy from now on
        _disable()
        return False
    return True


def taps_render(
    codes: np.ndarray,
    ftable: np.ndarray,
    taps: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    acc: np.ndarray,
    out: np.ndarray,
) -> bool:
    """Render codes through float area taps; False (nothing written) where the kernels do not apply.

    `out` = rint(clip(the folded area taps `taps` = (row indices, row weights, column indices, column
    weights) applied to `ftable[:, codes]`)) as uint8. False when the kernels are unavailable or the
    inputs are not what they are compiled for.
    """
    ks = kernels()
    if ks is None:
        return False
    ridx, rw, cidx, cw = taps
    if (
        codes.ndim != 2
        or codes.dtype not in (np.uint8, np.uint16)
        or ftable.dtype != np.float32
        or ftable.ndim != 2
        or ftable.shape[0] != 3
        or ftable.shape[1] < 1 << (8 * codes.dtype.itemsize)
        or rw.dtype != np.float32
        or cw.dtype != np.float32
        or out.dtype != np.uint8
        or out.ndim != 3
        or not out.flags.c_contiguous
        or out.shape[1:] != (ridx.shape[0], cidx.shape[0])
        or ridx.shape != rw.shape
        or cidx.shape != cw.shape
        or acc.shape != (3, out.shape[1], codes.shape[1])
    ):
        return False
    try:
        ks["taps"](np.ascontiguousarray(codes), np.ascontiguousarray(ftable), ridx, rw, cidx, cw, acc, out)
    except Exception:
        _disable()
        return False
    return True


def warm_up() -> bool:
    """Compile (or load from the disk cache) every kernel signature the conversion uses.

    For a process about to fork its workers, so that each does not compile its own. Returns when the
    kernels are ready, also when another thread is warming them up: True when they are available.
    """
    global _WARM
    if _WARM:
        return True
    if not available():
        return False
    with _WARM_LOCK:
        if not _WARM:
            _warm_up()
            _WARM = True
    return True


_WARM_LOCK = threading.Lock()


def _warm_up() -> None:
    table = np.zeros(1 << 16, dtype=np.uint64)
    out = np.empty((3, 2, 2), dtype=np.uint8)
    ftable = np.zeros((3, 1 << 16), dtype=np.float32)
    ridx, cidx = np.zeros((2, 2), dtype=np.intp), np.zeros((2, 2), dtype=np.intp)
    w = np.zeros((2, 2), dtype=np.float32)
    acc = np.zeros((3, 2, 4), dtype=np.float32)
    for dtype in (np.uint16, np.uint8):
        codes = np.zeros((4, 4), dtype=dtype)
        packed_block_render(codes, table, 2, 0, 0, 4, out)
        packed_block_render(codes, table, 2, 0, 0, 3, out)
        taps_render(codes, ftable, (ridx, w, cidx, w), acc, out)
