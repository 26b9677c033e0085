"""Windowing speed: the fast path against a plain float implementation, per 512×512 slice.

    python bench/windows.py [--slices 32] [--repeat 5]

Both compute DESIGN.md's reference (three windows at native size, 2×2 area mean, round once) from
int16 stored values of CT-like slices: plain float (HU in float64, `clip((hu - lo) / width, 0, 1) *
255` per window, 2×2 means, `rint`: what one writes without thinking about speed) and fast
(`ichdata.windows.window_stored`: packed fixed-point tables, one gather, integer block sums). It
checks that the two agree within ±1 on every pixel, then prints the median time per slice of each and
their ratio, in the same run. With `--files` it also times whole files: `read_rendered` against
`pydicom.dcmread` + `pixel_array` + the plain float windows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ichdata.windows import WINDOWS, window_stored


def ct_like_slices(n: int, size: int = 512, seed: int = 0) -> list[np.ndarray]:
    """int16 stored values (intercept -1024): air, a skull ring, brain with noise, some bright spots."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size - 0.5
    out = []
    for _ in range(n):
        r = np.hypot(y * rng.uniform(0.9, 1.1), x)
        hu = np.full((size, size), -1000.0)
        hu[r < 0.42] = 1200.0
        hu[r < 0.39] = 35.0
        hu += rng.normal(0, 8, hu.shape)
        hu[rng.random(hu.shape) < 0.002] = 2500.0
        out.append(np.clip(np.rint(hu + 1024.0), -32768, 32767).astype(np.int16))
    return out


def plain_float(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """The plain float64 implementation for a 512×512 slice (2×2 area mean)."""
    hu = stored.astype(np.float64) * slope + intercept
    channels = []
    for w in WINDOWS:
        windowed = np.clip((hu - (w.level - w.width / 2)) / w.width, 0.0, 1.0) * 255.0
        n = windowed.shape[0] // 2
        channels.append(windowed.reshape(n, 2, n, 2).mean(axis=(1, 3)))
    return np.rint(np.stack(channels)).astype(np.uint8)


def per_item_ms(fn: Callable[[object], object], items: list, repeat: int) -> float:
    """Median over `repeat` rounds of the mean time per item, in ms."""
    for item in items[:2]:
        fn(item)  # warm caches (the fast path's table)
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        rounds.append((time.perf_counter() - start) / len(items) * 1e3)
    return statistics.median(rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--files", action="store_true", help="also time whole DICOM files")
    args = parser.parse_args(argv)

    slope, intercept = 1.0, -1024.0
    slices = ct_like_slices(args.slices)
    worst = max(
        int(np.abs(window_stored(s, slope, intercept).astype(int) - plain_float(s, slope, intercept)).max())
        for s in slices
    )
    if worst > 1:
        raise SystemExit(f"fast path differs from the plain float implementation by {worst} (±1 allowed)")

    plain = per_item_ms(lambda s: plain_float(s, slope, intercept), slices, args.repeat)
    fast = per_item_ms(lambda s: window_stored(s, slope, intercept), slices, args.repeat)
    from ichdata import _kernels

    path = "compiled (Numba)" if _kernels.available() else "NumPy (ICH_NO_JIT=1 or no Numba)"
    print(f"slices: {args.slices} × 512×512 int16, max |fast - plain| = {worst}; render loop: {path}")
    print(f"plain float  {plain:7.2f} ms/slice")
    print(f"fast path    {fast:7.2f} ms/slice")
    print(f"ratio        {plain / fast:7.1f}×")

    if args.files:
        import pydicom

        from ichdata.dicom import read_rendered
        from ichdata.testing import write_ct_slice

        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, s in enumerate(slices):
                path = Path(tmp) / f"ID_{i:09x}.dcm"
                write_ct_slice(
                    path,
                    s,
                    image_id=path.stem,
                    study_uid="ID_s",
                    series_uid="ID_e",
                    patient_id="ID_p",
                    image_position=(0.0, 0.0, float(i)),
                    intercept=intercept,
                )
                paths.append(path)

            def pydicom_plain(path: Path) -> np.ndarray:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the ID_ UIDs
                    ds = pydicom.dcmread(path)
                    return plain_float(ds.pixel_array, float(ds.RescaleSlope), float(ds.RescaleIntercept))

            baseline = per_item_ms(pydicom_plain, paths, args.repeat)
            ours = per_item_ms(lambda p: read_rendered(p), paths, args.repeat)
        print(f"file: pydicom + plain float {baseline:7.2f} ms/slice")
        print(f"file: read_rendered         {ours:7.2f} ms/slice")
        print(f"file: ratio                 {baseline / ours:7.1f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
