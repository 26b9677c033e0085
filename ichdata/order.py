"""Slice order within a series: by position along the slice normal (DESIGN.md "Preprocessing" 4).

Never by file name, `(0020,0013) Instance Number` alone or the z coordinate alone: a gantry-tilted
series has an oblique normal, a coronal series has constant z, and RSNA files carry random names
and often no InstanceNumber.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["slice_order", "slice_position"]


def slice_position(
    image_position: Sequence[float] | np.ndarray, image_orientation: Sequence[float] | np.ndarray
) -> float:
    """The slice's position (mm) along its normal: `dot(ImagePositionPatient, normal)`.

    `image_position` is `(0020,0032) Image Position (Patient)` (x, y, z of the first pixel);
    `image_orientation` is `(0020,0037) Image Orientation (Patient)`, the row and column direction
    cosines. The normal is `cross(row_cosines, col_cosines)`, scaled to unit length (headers round
    the cosines). Raises ValueError for the wrong number of values or parallel/zero cosines.
    """
    # Plain floats, not NumPy: the scan calls this once per file, and NumPy's per-call overhead
    # dominates on 3-vectors.
    position = [float(v) for v in image_position]
    orientation = [float(v) for v in image_orientation]
    if len(position) != 3:
        raise ValueError(f"image position must be 3 numbers, got {len(position)}")
    if len(orientation) != 6:
        raise ValueError(f"image orientation must be 6 numbers, got {len(orientation)}")
    r0, r1, r2, c0, c1, c2 = orientation
    n0, n1, n2 = r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0
    length = math.sqrt(n0 * n0 + n1 * n1 + n2 * n2)
    if not math.isfinite(length) or length < 1e-6:
        raise ValueError(
            f"row and column cosines {orientation[:3]} and {orientation[3:]} do not span a plane"
        )
    return (position[0] * n0 + position[1] * n1 + position[2] * n2) / length


def slice_order(
    positions: Sequence[float] | np.ndarray,
    instance_numbers: Sequence[int | None],
    image_ids: Sequence[str],
) -> np.ndarray:
    """Indices that put one series' slices in order.

    Ascending `positions` (from `slice_position`); equal positions by InstanceNumber (missing ones
    last), then by image id. The result depends only on the slices, never on the order they are given in.
    """
    pos = np.asarray(positions, dtype=np.float64)
    n = pos.shape[0]
    if pos.ndim != 1 or len(instance_numbers) != n or len(image_ids) != n:
        raise ValueError(
            f"positions, instance_numbers and image_ids must be 1-D of one length, got "
            f"{pos.shape}, {len(instance_numbers)}, {len(image_ids)}"
        )
    if np.isnan(pos).any():
        raise ValueError("positions contain NaN")
    missing = np.fromiter((v is None for v in instance_numbers), dtype=bool, count=n)
    number = np.fromiter((0 if v is None else int(v) for v in instance_numbers), dtype=np.int64, count=n)
    ids = np.asarray([str(i) for i in image_ids], dtype=np.str_) if n else np.zeros(0, dtype=np.str_)
    # np.lexsort sorts by the last key first; it is stable, so the result is fully determined by the
    # keys (position, has-number, number, id) whatever the input order.
    return np.lexsort((ids, number, missing, pos)).astype(np.intp)
