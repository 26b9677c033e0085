"""Windowing: both entry points stay within ±1 of a plain float reference written here."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ichdata.windows import WINDOWS, Window, window_hu, window_stored


def _area_matrix(n: int, size: int) -> np.ndarray:
    """Exact area-averaging matrix (size, n): output i averages input over [i·n/size, (i+1)·n/size)."""
    a = np.zeros((size, n))
    for i in range(size):
        lo, hi = i * n / size, (i + 1) * n / size
        for j in range(int(np.floor(lo)), min(n, int(np.ceil(hi)))):
            a[i, j] = max(0.0, min(hi, j + 1) - max(lo, j)) / (n / size)
    return a


def reference(hu: np.ndarray, size: int = 256) -> np.ndarray:
    """DESIGN.md's reference, plainly: float64 windows at native size, centred air pad, area resize, round."""
    hu = np.asarray(hu, dtype=np.float64)
    rows, cols = hu.shape
    n = max(rows, cols)
    top, left = (n - rows) // 2, (n - cols) // 2
    a = _area_matrix(n, size)
    out = []
    for level, width in [(40, 80), (80, 200), (600, 2800)]:
        windowed = np.clip((hu - (level - width / 2)) / width, 0, 1) * 255
        padded = np.zeros((n, n))  # air renders 0 in all three windows
        padded[top : top + rows, left : left + cols] = windowed
        out.append(a @ padded @ a.T)
    return np.rint(np.array(out)).astype(np.uint8)


def _ct_like(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Integer HU covering air, every window's ramp and bone: a disc of tissue on air plus noise."""
    rows, cols = shape
    y, x = np.mgrid[:rows, :cols]
    r = np.hypot((y - rows / 2) / rows, (x - cols / 2) / cols)
    hu = np.where(r < 0.4, 40.0, -1000.0) + np.where((r > 0.36) & (r < 0.4), 1200.0, 0.0)
    hu += rng.normal(0, 60, shape)
    spread = rng.integers(-1100, 3100, shape)
    mask = rng.random(shape) < 0.3
    hu[mask] = spread[mask]
    return np.rint(hu).astype(np.int16)


def test_windows_are_brain_subdural_bone_in_that_order() -> None:
    assert [w.name for w in WINDOWS] == ["brain", "subdural", "bone"]
    assert WINDOWS[0] == Window("brain", 40.0, 80.0)
    assert (WINDOWS[1].level, WINDOWS[1].width) == (80.0, 200.0)
    assert (WINDOWS[2].level, WINDOWS[2].width) == (600.0, 2800.0)


def test_constant_image_gives_each_windows_value() -> None:
    # HU 60: brain (60-0)/80·255 = 191.25, subdural (60+20)/200·255 = 102, bone (60+800)/2800·255 = 78.32
    out = window_hu(np.full((512, 512), 60.0))
    assert out.shape == (3, 256, 256)
    assert out.dtype == np.uint8
    assert out[:, 0, 0].tolist() == [191, 102, 78]
    assert (out == out[:, :1, :1]).all()
    stored = np.full((512, 512), 1084, np.int16)
    assert window_stored(stored, 1.0, -1024.0)[:, 5, 7].tolist() == [191, 102, 78]


def test_air_is_zero_and_dense_bone_saturates_every_window() -> None:
    assert not window_hu(np.full((64, 64), -1000.0), size=32).any()
    assert (window_hu(np.full((64, 64), 5000.0), size=32) == 255).all()


def test_two_by_two_block_mean_rounded_once() -> None:
    # brain window levels 0, 63.75, 127.5, 191.25 in one 2×2 block: mean 95.625 -> 96 (not 0+64+128+191 / 4)
    hu = np.array([[0.0, 20.0], [40.0, 60.0]])
    assert window_hu(hu, size=1)[0, 0, 0] == 96


@pytest.mark.parametrize(
    "shape",
    [
        (512, 512),
        (512, 384),
        (638, 490),
        (490, 638),
        (768, 768),
        (408, 374),
        (128, 128),
        (256, 256),
        (301, 299),
    ],
)
def test_fast_paths_within_one_of_the_float_reference(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    stored = _ct_like(shape, rng)
    ref = reference(stored.astype(np.float64))
    from_hu = window_hu(stored.astype(np.float32))
    from_stored = window_stored(stored, 1.0, 0.0)
    for out in (from_hu, from_stored):
        assert out.shape == (3, 256, 256)
        assert out.dtype == np.uint8
        assert np.abs(out.astype(int) - ref).max() <= 1
    # Rounding differences are rare edge cases, not a systematic bias.
    assert (from_stored != ref).mean() < 0.01


@pytest.mark.parametrize(
    ("dtype", "slope", "intercept"),
    [
        (np.int16, 1.0, -1024.0),
        (np.uint16, 1.0, -1024.0),
        (np.uint16, 0.5, -1000.0),
        (np.int16, 2.0, 0.0),
        (np.uint8, 8.0, -1024.0),
        (np.int8, 20.0, 0.0),
        (np.int32, 1.0, -1024.0),  # a table over the value range
        (np.int64, 0.001, 0.0),  # a range wider than 65,536: the float path
    ],
)
def test_window_stored_matches_window_hu_of_the_rescaled_values(
    dtype: type, slope: float, intercept: float
) -> None:
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -3000), min(info.max, 5000)
    if dtype is np.int64:
        lo, hi = -2_000_000, 5_000_000
    stored: np.ndarray = rng.integers(lo, hi, (96, 80), endpoint=True).astype(dtype)
    ref = reference(stored.astype(np.float64) * slope + intercept, size=48)
    out = window_stored(stored, slope, intercept, size=48)
    assert np.abs(out.astype(int) - ref).max() <= 1


def test_window_stored_accepts_big_endian_values() -> None:
    stored = np.arange(-1024, 3072, dtype=np.int16).reshape(64, 64)
    assert np.array_equal(
        window_stored(stored.astype(">i2"), 1.0, 0.0, 32), window_stored(stored, 1.0, 0.0, 32)
    )


def test_non_square_is_centred_on_air() -> None:
    hu = np.full((64, 32), 3000.0)  # bone everywhere: 255 in every window
    out = window_hu(hu, size=64)
    assert (out[:, :, 16:48] == 255).all()
    assert not out[:, :, :16].any()
    assert not out[:, :, 48:].any()
    assert np.array_equal(window_stored(np.full((64, 32), 3000, np.int16), 1.0, 0.0, size=64), out)


def test_rejects_what_is_not_an_image() -> None:
    with pytest.raises(ValueError, match="2-D"):
        window_hu(np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="size"):
        window_hu(np.zeros((4, 4)), size=0)
    with pytest.raises(ValueError, match="integers"):
        window_stored(np.zeros((4, 4)), 1.0, 0.0)


_hu_images = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 24), st.integers(1, 24)),
    elements=st.floats(-2000, 4000, allow_nan=False, width=32),
)


@settings(max_examples=60, deadline=None)
@given(hu=_hu_images, size=st.integers(1, 20), shift=st.floats(0, 500))
def test_windows_are_bounded_and_monotone(hu: np.ndarray, size: int, shift: float) -> None:
    lower = window_hu(hu, size)
    higher = window_hu(hu + shift, size)
    assert lower.shape == (3, size, size)
    assert (lower <= higher).all()
    assert np.abs(lower.astype(int) - reference(hu, size)).max() <= 1


@settings(max_examples=60, deadline=None)
@given(
    stored=hnp.arrays(np.int16, st.tuples(st.integers(1, 24), st.integers(1, 24))),
    size=st.integers(1, 20),
    slope=st.sampled_from([1.0, 0.5, 2.0]),
    intercept=st.sampled_from([-1024.0, 0.0, -1000.0]),
)
def test_window_stored_within_one_of_reference(
    stored: np.ndarray, size: int, slope: float, intercept: float
) -> None:
    out = window_stored(stored, slope, intercept, size)
    ref = reference(stored.astype(np.float64) * slope + intercept, size)
    assert np.abs(out.astype(int) - ref).max() <= 1


# --- the compiled render loop (`ichdata._kernels`) against the NumPy passes it replaces ----------------


def test_the_compiled_kernel_is_what_runs_here() -> None:
    from ichdata import _kernels

    # Numba is a core dependency: the suite must exercise the kernel, not fall back silently.
    assert _kernels.available()


def _codes_and_table(rng: np.random.Generator, shape: tuple[int, int], dtype: type) -> tuple:
    from ichdata.dicom.hu import HuKey, hu_of_code

    bits = 8 * np.dtype(dtype).itemsize
    # Values inside the windows' ramps (saturated pixels would hide rounding mistakes): HU -200..1500
    # for 16-bit codes (stored = HU + 1024), HU 0..127 for 8-bit ones (stored = HU).
    table = hu_of_code(HuKey(bits, bits, True, 1.0, 0.0 if bits == 8 else -1024.0, False))[0]
    low, high = (0, 128) if bits == 8 else (1024 - 200, 1024 + 1500)
    codes: np.ndarray = rng.integers(low, high, shape).astype(dtype)
    return codes, table


@pytest.mark.parametrize(
    ("shape", "dtype", "size"),
    [
        ((512, 512), np.uint16, 256),  # RSNA: the k = 2 fast loop
        ((512, 512), np.uint8, 256),
        ((768, 768), np.uint16, 256),  # k = 3, a divisor that is not a power of two
        ((1024, 1024), np.uint16, 256),
        ((512, 384), np.uint16, 256),  # padded with air, integer factor
        ((384, 512), np.uint16, 256),
        ((511, 512), np.uint16, 256),  # an odd pad
        ((256, 256), np.uint16, 256),  # k = 1
        ((512, 512), np.uint16, 128),  # k = 4 to a smaller size
        ((512, 640), np.uint16, 256),  # non-integer factors: the float taps kernel
        ((490, 638), np.uint16, 256),
        ((374, 408), np.uint8, 256),
        ((257, 256), np.uint16, 256),
        ((100, 300), np.uint16, 256),  # upscaling
    ],
)
def test_kernel_renders_exactly_what_numpy_renders(shape: tuple[int, int], dtype: type, size: int) -> None:
    from ichdata.windows import _render_codes

    codes, hu_of_code = _codes_and_table(np.random.default_rng(sum(shape)), shape, dtype)
    compiled = _render_codes(codes, hu_of_code, size, ("kernel-test", dtype), jit=True)
    plain = _render_codes(codes, hu_of_code, size, ("kernel-test", dtype), jit=False)
    assert compiled.dtype == np.uint8
    assert compiled.shape == (3, size, size)
    np.testing.assert_array_equal(compiled, plain)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 6),
    size=st.sampled_from([4, 8, 16, 24]),
    short=st.floats(0.01, 1.0),
    tall=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_kernel_equals_numpy_on_any_integer_factor(
    k: int, size: int, short: float, tall: bool, seed: int
) -> None:
    from ichdata.windows import _render_codes

    n = k * size  # the padded square's side: an integer factor, which the kernel renders
    other = max(1, round(n * short))
    shape = (n, other) if tall else (other, n)
    codes, hu_of_code = _codes_and_table(np.random.default_rng(seed), shape, np.uint16)
    out = np.full((3, size, size), 7, dtype=np.uint8)  # a row of a shard block, written in place
    _render_codes(codes, hu_of_code, size, ("kernel-test", np.uint16), out=out, jit=True)
    plain = _render_codes(codes, hu_of_code, size, ("kernel-test", np.uint16), jit=False)
    np.testing.assert_array_equal(out, plain)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 90),
    cols=st.integers(1, 90),
    size=st.integers(2, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_kernels_equal_numpy_on_any_shape(rows: int, cols: int, size: int, seed: int) -> None:
    from ichdata.windows import _render_codes

    codes, hu_of_code = _codes_and_table(np.random.default_rng(seed), (rows, cols), np.uint16)
    compiled = _render_codes(codes, hu_of_code, size, ("kernel-test", np.uint16), jit=True)
    plain = _render_codes(codes, hu_of_code, size, ("kernel-test", np.uint16), jit=False)
    np.testing.assert_array_equal(compiled, plain)


@pytest.fixture
def fresh_kernels(monkeypatch: pytest.MonkeyPatch) -> object:
    """`ichdata._kernels` with its process-wide state reset for one test (and restored after)."""
    from ichdata import _kernels

    monkeypatch.setattr(_kernels, "_KERNELS", None)
    monkeypatch.setattr(_kernels, "_FAILED", False)
    return _kernels


def test_kernels_compile_in_memory_when_numba_cannot_cache(
    fresh_kernels: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    k: Any = fresh_kernels
    real = k._compile
    calls: list[bool] = []

    def compile_(cache: bool = True) -> object:
        calls.append(cache)
        if cache:  # what Numba raises where neither the package nor the home folder is writable
            raise RuntimeError("cannot cache function 'square_k2': no locator available")
        return real(cache=False)

    monkeypatch.setattr(k, "_compile", compile_)
    assert k.available()
    assert calls == [True, False]


def test_renders_through_numpy_when_the_kernels_fail(
    fresh_kernels: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ichdata.windows import _render_codes

    k: Any = fresh_kernels

    def broken(*args: object) -> None:
        raise RuntimeError("LLVM cannot compile for this CPU")

    monkeypatch.setattr(
        k, "_compile", lambda cache=True: {"square_k2": broken, "blocks": broken, "taps": broken}
    )
    codes, hu_of_code = _codes_and_table(np.random.default_rng(5), (512, 512), np.uint16)
    got = _render_codes(codes, hu_of_code, 256, ("kernel-test", np.uint16))
    np.testing.assert_array_equal(
        got, _render_codes(codes, hu_of_code, 256, ("kernel-test", np.uint16), jit=False)
    )
    assert not k.available()  # disabled for the rest of the process
