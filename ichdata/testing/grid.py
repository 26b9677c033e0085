"""The phantom's head frame: per-study pixel coordinates and the archive's random fields.

`Grid` gives every pixel its head-frame position (u, v) in mm, its normalised elliptic radius `rho0`
and its bin in the radial lookup table that `ichdata.testing.render` draws the layers from;
`RandomFields` holds the sulcal fields and the CT noise that every study cuts its slices from.
"""

from __future__ import annotations

import numpy as np

from ichdata.testing.study import Study

__all__ = ["RADIAL_BINS", "RHO0_MAX", "Box", "Grid", "Parts", "RandomFields", "soft"]

Box = tuple[slice, slice]
Parts = list[tuple[Box, np.ndarray]]

RADIAL_BINS = 4096  # radial lookup-table bins
RHO0_MAX = 1.3  # normalised radius covered by the table; beyond it, air
_SULCAL_WAVELENGTH_MM = 15.0


class RandomFields:
    """Per-archive random fields, cut at per-study and per-slice offsets.

    Band-passed fields whose zero crossings are the sulci, and spatially correlated CT noise.
    Computing them once keeps each slice to a few array operations.
    """

    def __init__(self, rng: np.random.Generator, size: int, spacing: float) -> None:
        self.size = size
        f = np.fft.fftfreq(size, d=spacing)
        fr = np.hypot(f[:, None], f[None, :])
        f0 = min(1.0 / _SULCAL_WAVELENGTH_MM, 0.2 / spacing)
        white = rng.standard_normal((2, size, size), dtype=np.float32)
        z = np.fft.ifft2(np.fft.fft2(white[0] + 1j * white[1]) * np.exp(-(((fr - f0) / (0.4 * f0)) ** 2)))
        z /= np.sqrt(np.mean(np.abs(z) ** 2) / 2)
        self.sulci = np.stack([z.real, z.imag]).astype(np.float32)
        # The sulcal field's mean change per pixel: the soft edge of a sulcus is one pixel wide, and
        # a sulcus `h` mm wide each side of the zero crossing is where |field| < h * (change per mm).
        per_px = float(np.mean(np.abs(np.diff(self.sulci[0], axis=1)))) * 1.3
        self.sulcal_gain = 1.0 / per_px
        self.sulcal_per_mm = per_px / spacing
        # CT noise: correlated over ~0.7 mm (a soft reconstruction kernel), unit standard deviation.
        white_noise = rng.standard_normal((size, size), dtype=np.float32)
        n = np.fft.ifft2(np.fft.fft2(white_noise) * np.exp(-((fr * 0.7) ** 2))).real
        self.noise = (n / n.std()).astype(np.float32)


class Grid:
    """Per-study coordinate arrays.

    The head frame of every pixel, its elliptic radius and angle, and the radial lookup index.
    """

    def __init__(self, st: Study, banks: RandomFields) -> None:
        an = st.anatomy
        x = (np.arange(st.cols, dtype=np.float32) - (st.cols - 1) / 2) * st.spacing - st.cx
        y = (np.arange(st.rows, dtype=np.float32) - (st.rows - 1) / 2) * st.spacing - st.cy
        c, s = np.float32(np.cos(st.yaw)), np.float32(np.sin(st.yaw))
        self.u = c * x[None, :] + s * y[:, None]
        self.v = -s * x[None, :] + c * y[:, None]
        self.theta = np.arctan2(self.v / an.b, self.u / an.a).astype(np.float32)
        self.rho0 = (np.hypot(self.u / an.a, self.v / an.b) * an.outline(self.theta)).astype(np.float32)
        self.idx = np.minimum(
            (self.rho0 * np.float32(RADIAL_BINS / RHO0_MAX)).astype(np.int32), RADIAL_BINS - 1
        )
        oy, ox = st.field_offset
        self.f1 = banks.sulci[0, oy : oy + st.rows, ox : ox + st.cols]
        self.f2 = banks.sulci[1, oy : oy + st.rows, ox : ox + st.cols]
        self.sulcal_gain = np.float32(banks.sulcal_gain)
        self.sulcal_per_mm = banks.sulcal_per_mm
        self.st = st
        self.pix = st.spacing

    def box(self, us: np.ndarray, vs: np.ndarray, margin_mm: float = 2.0) -> Box | None:
        """The pixel bounding box of head-frame points (plus a margin), or None if off the image."""
        st = self.st
        c, s = np.cos(st.yaw), np.sin(st.yaw)
        x = st.cx + c * us - s * vs
        y = st.cy + s * us + c * vs
        j = x / st.spacing + (st.cols - 1) / 2
        i = y / st.spacing + (st.rows - 1) / 2
        m = margin_mm / st.spacing + 1
        i0, i1 = int(max(np.floor(i.min() - m), 0)), int(min(np.ceil(i.max() + m) + 1, st.rows))
        j0, j1 = int(max(np.floor(j.min() - m), 0)), int(min(np.ceil(j.max() + m) + 1, st.cols))
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(i0, i1), slice(j0, j1)

    def ellipse_box(self, uc: float, vc: float, ra: float, rb: float, margin_mm: float = 2.0) -> Box | None:
        """The pixel bounding box of an axis-aligned ellipse in the head frame."""
        us = np.array([uc - ra, uc + ra, uc - ra, uc + ra])
        vs = np.array([vc - rb, vc - rb, vc + rb, vc + rb])
        return self.box(us, vs, margin_mm)

    def arc_box(self, theta0: float, half: float, rho_outer: float, rho_inner: float) -> Box | None:
        """Bounding box of the band between two elliptic radii over an angular range."""
        an = self.st.anatomy
        th = np.linspace(theta0 - half, theta0 + half, 13)
        rr = np.concatenate([np.full(13, rho_outer), np.full(13, max(rho_inner, 0.0))])
        th2 = np.concatenate([th, th])
        scale = rr / an.outline(th2)
        return self.box(scale * an.a * np.cos(th2), scale * an.b * np.sin(th2))


def soft(signed_distance_px: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a pixel whose centre lies `signed_distance_px` inside an edge."""
    return np.clip(signed_distance_px + 0.5, 0.0, 1.0)
