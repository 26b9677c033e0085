"""The per-file PNG baseline our users run today (the one-off script of the RSNA write-ups).

One PNG per slice: pydicom reads the whole file, HU with the RSNA 12-bit fix, the three windows in
NumPy float, OpenCV area resize to 256×256, `cv2.imwrite` of a 3-channel PNG; a process pool. No
ordering, no record of what failed (a failing file is skipped and counted). `bench/convert.py`
measures `ich convert` against it; `bench/loader.py` can read its output back (`read_png`).

Two variants (`dtype`): `"float64"`, the typical script (`ds.pixel_array * slope + intercept`, as
pydicom's `apply_modality_lut`, is float64 and NumPy keeps it through the windows and the resize);
`"float32"`, the same steps with the stored values cast to float32 first: a tuned script, the harder
baseline to beat (their figures: bench/RESULTS.md).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))  # brain, subdural, bone (level, width)


DTYPES = ("float64", "float32")


def hu_of(ds, dtype: str = "float32") -> np.ndarray:
    """HU of a pydicom dataset, with the RSNA 12-bit correction (DESIGN.md step 1).

    `dtype` "float64": `pixel_array * slope + intercept` as a typical script writes it (NumPy promotes
    the integer stored values to float64); "float32": the stored values cast to float32 first.
    """
    px = ds.pixel_array
    if dtype == "float32":
        px = px.astype(np.float32)
    elif dtype != "float64":
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    if int(ds.BitsStored) == 12 and int(ds.PixelRepresentation) == 0 and intercept > -100:
        px = px.astype(np.int32) + 1000 if dtype == "float64" else px + 1000
        px[px >= 4096] -= 4096
        intercept = -1000.0
    return px * slope + intercept


def render(hu: np.ndarray, size: int = 256) -> np.ndarray:
    """The baseline's rendering of `hu` as uint8 (size, size, 3).

    Windows in float (hu's dtype) at native size, padded square with air, area resize.
    """
    import cv2

    rows, cols = hu.shape
    n = max(rows, cols)
    chans = []
    for level, width in WINDOWS:
        w = np.clip((hu - (level - width / 2)) / width, 0.0, 1.0) * 255.0
        if (rows, cols) != (n, n):
            sq = np.zeros((n, n), hu.dtype)
            sq[(n - rows) // 2 : (n - rows) // 2 + rows, (n - cols) // 2 : (n - cols) // 2 + cols] = w
            w = sq
        chans.append(w)
    img = np.stack(chans, axis=-1)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def convert_one(args: tuple[str, str, str]) -> int:
    """DICOM file → PNG file; returns the PNG's size in bytes (0 when the file could not be read)."""
    import warnings

    import cv2
    import pydicom

    src, out_dir, dtype = args
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RSNA's `ID_…` UIDs make pydicom warn on every file
            ds = pydicom.dcmread(src)
            img = render(hu_of(ds, dtype))
    except Exception:
        return 0
    dst = os.path.join(out_dir, Path(src).stem + ".png")
    cv2.imwrite(dst, img[..., ::-1])  # OpenCV writes BGR
    return os.path.getsize(dst)


def convert_folder(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str], workers: int = 2, dtype: str = "float32"
) -> dict:
    """Convert every `*.dcm` under `source` to PNGs in `out_dir` with a pool of `workers` processes.

    HU and windows are computed in `dtype` ("float64": the typical script; "float32": the tuned one).

    Returns {"n": slices written, "failed": n, "seconds": wall time incl. listing, "bytes": PNG bytes}.
    """
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    files = sorted(str(p) for p in Path(source).rglob("*.dcm"))
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(convert_one, [(f, str(out_dir), dtype) for f in files], chunksize=32))
    n = sum(1 for s in sizes if s)
    return {"n": n, "failed": len(files) - n, "seconds": time.perf_counter() - t0, "bytes": int(sum(sizes))}


def read_png(path: str | os.PathLike[str]) -> np.ndarray:
    """A baseline PNG back as uint8 (3, 256, 256), channels brain/subdural/bone like the store."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))


def main(argv: list[str] | None = None) -> int:
    """The script as its users run it: `python bench/_png_baseline.py SOURCE OUT [--workers N]`."""
    import argparse

    ap = argparse.ArgumentParser(description="one PNG per DICOM slice (the baseline)")
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    a = ap.parse_args(argv)
    r = convert_folder(a.source, a.out, workers=a.workers, dtype=a.dtype)
    print(f"{r['n']} PNGs ({r['failed']} failed) in {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
