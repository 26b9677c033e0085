"""Head-CT phantom series as NumPy arrays: HU volume, per-slice labels and where the blood is.

`phantom_series` draws a study (`study.py`: skull, brain, CSF, ventricles, cisterns,
calcifications, noise, hemorrhages where each subtype occurs) and renders it (`render.py`), with
no files written; `archive.py` writes many such series as DICOM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ichdata.testing.grid import RandomFields
from ichdata.testing.render import bank_size, render_study
from ichdata.testing.study import SUBTYPES, draw_anatomy, draw_study, study_labels

__all__ = ["Phantom", "phantom_series"]


@dataclass(frozen=True)
class Phantom:
    """One synthetic head-CT series: HU volume and per-slice labels, in slice order (base to vertex)."""

    hu: np.ndarray  # (T, rows, cols) float32
    labels: np.ndarray  # (T, 6) uint8, columns CLASSES
    lesion_pixels: np.ndarray  # (T, 5) int64: pixels at least half blood, per subtype
    lesion_runs: tuple[tuple[str, int, int], ...]  # (subtype, first, last) slice runs, inclusive
    slice_z: np.ndarray  # (T,) table position of each slice (mm)
    pixel_spacing: float  # mm
    masks: np.ndarray | None = None  # (T, 5, rows, cols) float32 blood fraction, if asked for


def phantom_series(
    seed: int | np.random.Generator = 0,
    *,
    n_slices: int = 32,
    image_size: int = 512,
    cols: int | None = None,
    lesions: Sequence[tuple[str, int, int]] | str = "random",
    with_masks: bool = False,
) -> Phantom:
    """A head-CT phantom series (pure NumPy, no files): skull, brain, CSF, ventricles, noise.

    `lesions="random"` draws a positive study (one lesion spanning its positive run, others joining
    on sub-runs); a sequence of `(subtype, first, last)` places those runs (`()` = no lesion; a run
    outside the slices where its subtype can occur raises ValueError). Each lesion is faint and
    small at both ends of its run. `image_size` is the number of rows (and of columns unless `cols`).
    """
    if n_slices < 3:
        raise ValueError(f"n_slices must be at least 3, got {n_slices}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    # Two streams: the anatomy and lesions do not depend on the image size, the noise fields do.
    rng, bank_rng = (seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)).spawn(2)
    rows, ncols = image_size, cols or image_size
    an = draw_anatomy(rng)
    size = bank_size(rows, ncols)
    if isinstance(lesions, str):
        if lesions != "random":
            raise ValueError(
                f"lesions must be 'random' or a sequence of (subtype, first, last), got {lesions!r}"
            )
        runs = None
    else:
        runs = list(lesions)
    st = draw_study(
        rng,
        an,
        rows=rows,
        cols=ncols,
        n_slices=n_slices,
        bank_size=size,
        lesions=runs,
        coverage=float(rng.uniform(0.15, 0.55)),
    )
    banks = RandomFields(bank_rng, size, 240.0 / max(rows, ncols))
    hu = np.empty((n_slices, rows, ncols), dtype=np.float32)
    counts = np.zeros((n_slices, len(SUBTYPES)), dtype=np.int64)
    masks = np.zeros((n_slices, len(SUBTYPES), rows, ncols), dtype=np.float32) if with_masks else None
    for k, (h, c, m) in enumerate(render_study(st, banks, with_masks)):
        hu[k], counts[k] = h, c
        if masks is not None and m is not None:
            masks[k] = m
    return Phantom(
        hu=hu,
        labels=study_labels(st),
        lesion_pixels=counts,
        lesion_runs=tuple((x.subtype, x.first, x.last) for x in st.lesions),
        slice_z=st.z.copy(),
        pixel_spacing=st.spacing,
        masks=masks,
    )
