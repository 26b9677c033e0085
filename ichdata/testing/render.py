"""Render a drawn phantom `Study` into HU, slice by slice, with the blood drawn on each slice.

Coordinates: the head frame (u, v) in mm, u left to right, v anterior (-) to posterior (+), which is
the image's row direction, so the occiput (where blood layers in a supine patient) is at the bottom.
`rho0` is a pixel's normalised elliptic radius, so every layer (scalp, skull tables, CSF, cortex,
white matter) is one lookup in a per-slice radial profile (`ichdata.testing.grid`); the smaller
structures (ventricles, cisterns, lesions) are drawn in their bounding boxes. What is drawn comes
from `study.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ichdata.testing.grid import RADIAL_BINS, RHO0_MAX, Box, Grid, Parts, RandomFields, soft
from ichdata.testing.study import SUBTYPES, Anatomy, Lesion, Study, head_scale

__all__ = ["bank_size", "render_study"]

_AIR, _CSF, _GREY, _WHITE, _FAT = -1000.0, 7.0, 38.0, 29.0, -90.0


def _run_profile(lesion: Lesion, k: int) -> tuple[float, float]:
    """(contrast, size) of a lesion on slice k of its run.

    Faint and small at the ends, as a partial volume of blood would be, so that an end slice alone
    is ambiguous and its neighbours decide.
    """
    n = lesion.last - lesion.first + 1
    e = min(k - lesion.first, lesion.last - k)
    alpha = lesion.alpha_end[0] if e == 0 else lesion.alpha_end[1] if e == 1 else 1.0
    size = 0.45 + 0.55 * float(np.sin(np.pi * (k - lesion.first + 0.5) / n))
    return alpha, size


def _depths(an: Anatomy, t: float, s: float) -> dict[str, float]:
    """Depths (mm below the scalp surface) of the layer boundaries on a slice.

    Skull looks thicker where the slice cuts it obliquely (base and vertex) and is thicker at the base.
    """
    oblique = min(1.0 / max(s, 0.3) ** 0.6, 1.8)
    skull = an.skull * oblique * (1.0 + 0.5 * max(0.0, 0.2 - t) / 0.2)
    outer = an.scalp
    inner = outer + skull
    return {"outer": outer, "inner": inner, "cortex": inner + an.csf, "white": inner + an.csf + 3.0}


def _radial_tables(st: Study, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, float], float]:
    """The slice's radial profile (HU per lookup bin) and the sulcal band weight per bin."""
    an = st.anatomy
    t = float(st.t[k])
    s = head_scale(t)
    d = _depths(an, t, s)
    r0 = an.r0
    rho = (np.arange(RADIAL_BINS, dtype=np.float64) + 0.5) * (RHO0_MAX / RADIAL_BINS)
    depth = (s - rho) * r0
    skull = d["inner"] - d["outer"]
    table = min(1.8, skull / 3)
    white = _WHITE if t > 0.25 else 33.0
    edges = [
        0.0,
        1.2,
        1.2 + 0.5 * (an.scalp - 1.2),
        an.scalp,
        d["outer"] + table,
        d["inner"] - table,
        d["inner"],
        d["cortex"],
        d["white"],
    ]
    values = [_AIR, 45.0, _FAT, 35.0, 1450.0 * an.bone, 780.0 * an.bone, 1450.0 * an.bone, _CSF, _GREY, white]
    prof = np.asarray(values, dtype=np.float64)[np.searchsorted(edges, depth, side="right")]
    # Partial volume: average the profile over one pixel (a box of the pixel's width in bins).
    w = max(1, round(st.spacing / (RHO0_MAX * r0 / RADIAL_BINS)))
    if w > 1:
        c = np.concatenate([[0.0], np.cumsum(prof)])
        lo = np.clip(np.arange(RADIAL_BINS) - w // 2, 0, RADIAL_BINS)
        hi = np.clip(lo + w, 0, RADIAL_BINS)
        prof = (c[hi] - c[lo]) / (hi - lo)
    # Sulci: open at the brain surface, tapering to nothing 12 mm deep.
    band = np.clip(1.0 - (depth - d["inner"]) / 12.0, 0.0, 1.0) * (depth > d["inner"])
    return prof.astype(np.float32), band.astype(np.float32), d, s


def _brain_fraction(g: Grid, box: Box, s: float, d: dict[str, float]) -> np.ndarray:
    """Fraction of each pixel in the box that lies inside the inner skull table."""
    depth_px = ((s - g.rho0[box]) * g.st.anatomy.r0 - d["inner"]) / g.pix
    return soft(depth_px)


def _ellipse_fraction(
    g: Grid, box: Box, uc: float, vc: float, ra: float, rb: float, bend: float = 0.0
) -> np.ndarray:
    """Partial-volume fraction of an ellipse (optionally bent: its centre line u = uc + bend·(v-vc)²)."""
    du = g.u[box] - uc - bend * (g.v[box] - vc) ** 2
    dv = g.v[box] - vc
    q = np.sqrt((du / ra) ** 2 + (dv / rb) ** 2)
    return soft((1.0 - q) * min(ra, rb) / g.pix)


def _blend(hu: np.ndarray, box: Box, frac: np.ndarray, value: float | np.ndarray) -> None:
    view = hu[box]
    view += frac * (value - view)


def _ventricle_parts(g: Grid, t: float) -> Parts:
    """The lateral (two), third and fourth ventricles on a slice: (box, fraction) pairs."""
    an = g.st.anatomy
    parts = []
    if 0.30 < t < 0.68:
        f = float(np.sin(np.pi * (t - 0.30) / 0.38)) ** 0.7
        if f > 0.12:
            ra, rb, vc, bend = (1.5 + 4.0 * f) * an.ventricles, (12.0 + 20.0 * f) * an.ventricles, 3.0, 0.008
            for sign in (-1.0, 1.0):
                uc = sign * (4.0 + 4.0 * an.ventricles)
                reach = abs(bend) * rb * rb
                box = g.box(np.array([uc - ra - reach, uc + ra + reach]), np.array([vc - rb, vc + rb]))
                if box is not None:
                    parts.append((box, _ellipse_fraction(g, box, uc, vc, ra, rb, sign * bend)))
    if 0.26 < t < 0.38:
        box = g.ellipse_box(0.0, 2.0, 1.6, 11.0 * an.ventricles)
        if box is not None:
            parts.append((box, _ellipse_fraction(g, box, 0.0, 2.0, 1.6, 11.0 * an.ventricles)))
    if 0.06 < t < 0.2:
        box = g.ellipse_box(0.0, 30.0, 5.0, 3.0)
        if box is not None:
            parts.append((box, _ellipse_fraction(g, box, 0.0, 30.0, 5.0, 3.0)))
    return parts


def _cistern_parts(g: Grid, t: float) -> Parts:
    """Basal cisterns (a ring around the midbrain) and the Sylvian fissures.

    Basal subarachnoid blood collects there.
    """
    parts = []
    if 0.16 < t < 0.30:
        box = g.ellipse_box(0.0, 6.0, 15.0, 15.0)
        if box is not None:
            du, dv = g.u[box], g.v[box] - 6.0
            r = np.hypot(du, dv)
            phi = np.arctan2(dv, du)
            outer = 13.5 + 2.0 * np.cos(5 * phi)
            parts.append((box, soft((r - 10.0) / g.pix) * soft((outer - r) / g.pix)))
    if 0.22 < t < 0.42:
        for sign in (-1.0, 1.0):
            u0, v0, u1, v1 = sign * 14.0, -6.0, sign * 52.0, -16.0
            box = g.box(np.array([u0, u1]), np.array([v0, v1]))
            if box is None:
                continue
            du, dv = g.u[box] - u0, g.v[box] - v0
            lu, lv = u1 - u0, v1 - v0
            length = np.hypot(lu, lv)
            along = (du * lu + dv * lv) / length
            across = np.abs(du * lv - dv * lu) / length
            frac = soft((1.3 - across) / g.pix) * soft(along / g.pix) * soft((length - along) / g.pix)
            parts.append((box, frac))
    return parts


def _sulcal_fraction(g: Grid, box: Box, band: np.ndarray, phase: float, half_width_mm: float) -> np.ndarray:
    """Where the slice's sulcal field crosses zero, within the band.

    The sulci (or, wider, the blood-filled sulci of subarachnoid hemorrhage), `half_width_mm` each
    side at the surface.
    """
    width = half_width_mm * g.sulcal_per_mm
    f = np.multiply(g.f1[box], np.float32(np.cos(phase)))
    tmp = np.multiply(g.f2[box], np.float32(np.sin(phase)))
    f += tmp
    np.abs(f, out=f)
    out = band.take(g.idx[box])
    out *= np.float32(width)
    out -= f
    out *= g.sulcal_gain
    return np.clip(out, 0.0, 1.0, out=out)


def _draw_brain(g: Grid, hu: np.ndarray, t: float, s: float, d: dict[str, float]) -> None:
    """Deep grey nuclei, the interhemispheric fissure and falx, the ventricles and the cisterns."""
    an = g.st.anatomy
    if 0.28 < t < 0.46:
        for sign in (-1.0, 1.0):
            box = g.ellipse_box(sign * 15.0, 8.0, 8.0, 11.0)
            if box is not None:
                _blend(hu, box, 0.8 * _ellipse_fraction(g, box, sign * 15.0, 8.0, 8.0, 11.0), 36.0)
    # The falx's slight hyperdensity is a classic mimic of blood.
    if t > 0.28:
        vmax = s * an.b
        box = g.box(np.array([-4.0, 4.0]), np.array([-vmax, vmax]))
        if box is not None:
            au = np.abs(g.u[box])
            keep = _brain_fraction(g, box, s, d)
            if t < 0.65:
                vb = g.v[box]
                keep = keep * soft((np.maximum(-25.0 - vb, vb - 35.0)) / g.pix)
            _blend(hu, box, keep * soft((1.4 - au) / g.pix), _CSF)
            _blend(hu, box, keep * min(1.0, 0.7 / g.pix) * soft((0.35 - au) / g.pix), 75.0)
    for box, frac in _ventricle_parts(g, t):
        _blend(hu, box, frac, 5.0)
    for box, frac in _cistern_parts(g, t):
        _blend(hu, box, frac, _CSF)


def _draw_skull_base(g: Grid, hu: np.ndarray, t: float, s: float) -> None:
    """Petrous ridges and the sphenoid sinus at the skull base; the frontal sinus higher up."""
    an = g.st.anatomy
    if t < 0.2:
        w = 2.0 + 3.0 * (0.2 - t) / 0.2
        for sign in (-1.0, 1.0):
            u0, v0, u1, v1 = sign * 16.0, 10.0, sign * 50.0, 36.0
            box = g.box(np.array([u0, u1]), np.array([v0, v1]), margin_mm=w + 2)
            if box is not None:
                du, dv = g.u[box] - u0, g.v[box] - v0
                lu, lv = u1 - u0, v1 - v0
                length = np.hypot(lu, lv)
                along = (du * lu + dv * lv) / length
                across = np.abs(du * lv - dv * lu) / length
                frac = soft((w - across) / g.pix) * soft(along / g.pix) * soft((length - along) / g.pix)
                _blend(hu, box, frac, 1250.0 * an.bone)
    if t < 0.14:
        box = g.ellipse_box(0.0, -32.0, 14.0, 11.0)
        if box is not None:
            _blend(hu, box, _ellipse_fraction(g, box, 0.0, -32.0, 14.0, 11.0), 900.0 * an.bone)
            _blend(hu, box, _ellipse_fraction(g, box, 0.0, -32.0, 12.5, 9.5), _AIR)
    if 0.22 < t < 0.34:
        vc = -(s * an.b - an.scalp - 3.5)
        box = g.ellipse_box(0.0, vc, 13.0, 2.5)
        if box is not None:
            _blend(hu, box, _ellipse_fraction(g, box, 0.0, vc, 13.0, 2.5), _AIR)


def _draw_calcifications(g: Grid, hu: np.ndarray, t: float) -> None:
    """Choroid plexus in the atria and the pineal gland: bright, but not blood."""
    an = g.st.anatomy
    if an.choroid_calcified and 0.42 < t < 0.56:
        for sign in (-1.0, 1.0):
            uc, vc = sign * (10.0 + 5.0 * an.ventricles), 3.0 + 22.0 * an.ventricles
            box = g.ellipse_box(uc, vc, 3.0, 3.0)
            if box is not None:
                _blend(hu, box, _ellipse_fraction(g, box, uc, vc, 2.2, 2.8), 220.0)
    if an.pineal_calcified and 0.32 < t < 0.40:
        box = g.ellipse_box(0.0, 17.0, 3.0, 3.0)
        if box is not None:
            _blend(hu, box, _ellipse_fraction(g, box, 0.0, 17.0, 2.0, 2.0), 160.0)


def _draw_mimic(g: Grid, hu: np.ndarray, k: int, s: float, d: dict[str, float]) -> None:
    """Slice k's faint hyperdensity, if it has one (beam hardening, a vessel, partial volume).

    It mimics the faint ends of a lesion run, which only the neighbouring slices tell apart.
    """
    mimic = g.st.mimics[k]
    if mimic is not None:
        mu, mv, mr, mamp = mimic
        box = g.ellipse_box(mu, mv, mr, mr)
        if box is not None:
            frac = _ellipse_fraction(g, box, mu, mv, mr, 0.8 * mr) * _brain_fraction(g, box, s, d)
            hu[box] += mamp * frac


def _draw_lesions(
    g: Grid,
    hu: np.ndarray,
    k: int,
    s: float,
    d: dict[str, float],
    band: np.ndarray,
    phase: float,
    with_masks: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Blend slice k's blood into `hu`; its pixel counts per subtype and, if asked, the blood fractions."""
    st = g.st
    counts = np.zeros(len(SUBTYPES), dtype=np.int64)
    masks = np.zeros((len(SUBTYPES), st.rows, st.cols), dtype=np.float32) if with_masks else None
    for lesion in st.lesions:
        if not lesion.first <= k <= lesion.last:
            continue
        alpha, size = _run_profile(lesion, k)
        ci = SUBTYPES.index(lesion.subtype)
        for box, frac in _lesion_parts(g, lesion, k, size, s, d, band, phase):
            _blend(hu, box, alpha * frac, lesion.blood)
            counts[ci] += int(np.count_nonzero(frac >= 0.5))
            if masks is not None:
                np.maximum(masks[ci][box], frac, out=masks[ci][box])
            if lesion.subtype == "intraparenchymal":
                # Perilesional oedema: a hypodense rim.
                edema = _lesion_parts(g, lesion, k, size, s, d, band, phase, grow_mm=lesion.p["edema"])
                for ebox, efrac in edema:
                    hu[ebox] -= alpha * 7.0 * np.clip(efrac - _pad_to(frac, box, ebox), 0.0, 1.0)
    return counts, masks


def _render_slice(
    g: Grid, k: int, noise: np.ndarray, with_masks: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """HU of slice k, its lesion pixel counts and, if asked, its blood fractions.

    Returns:
        The HU (float32 rows×cols), the pixels at least half blood per subtype, and the per-subtype
        blood fractions (5, rows, cols) or None.
    """
    st = g.st
    t = float(st.t[k])
    prof, band, d, s = _radial_tables(st, k)
    hu = prof.take(g.idx)
    phase = st.sulcal_phase + 0.09 * float(st.z[k])
    head = g.arc_box(0.0, np.pi, s - d["inner"] / st.anatomy.r0, 0.0)
    if head is not None:
        _blend(hu, head, _sulcal_fraction(g, head, band, phase, 0.8), _CSF)
    _draw_brain(g, hu, t, s, d)
    _draw_skull_base(g, hu, t, s)
    _draw_calcifications(g, hu, t)
    _draw_mimic(g, hu, k, s, d)
    counts, masks = _draw_lesions(g, hu, k, s, d, band, phase, with_masks)
    hu += st.noise_sd * noise
    return hu, counts, masks


def _pad_to(frac: np.ndarray, box: Box, big: Box) -> np.ndarray:
    """`frac` (defined on `box`) placed into the enclosing box `big`, zeros elsewhere."""
    out = np.zeros((big[0].stop - big[0].start, big[1].stop - big[1].start), dtype=frac.dtype)
    i0, j0 = box[0].start - big[0].start, box[1].start - big[1].start
    out[i0 : i0 + frac.shape[0], j0 : j0 + frac.shape[1]] = frac
    return out


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def _lesion_parts(
    g: Grid,
    lesion: Lesion,
    k: int,
    size: float,
    s: float,
    d: dict[str, float],
    band: np.ndarray,
    phase: float,
    grow_mm: float = 0.0,
) -> Parts:
    """The blood fraction of one lesion on slice k, as (box, fraction) pairs."""
    an = g.st.anatomy
    p = lesion.p
    r0 = an.r0
    mid = 0.5 * (lesion.first + lesion.last)
    rho_in = s - d["inner"] / r0
    if lesion.subtype in ("epidural", "subdural"):
        theta0 = p["theta"] + p["drift"] * (k - mid)
        half = p["half"] * (0.6 + 0.4 * size)
        thick = p["thick"] * size
        box = g.arc_box(theta0, half, rho_in + 0.01, rho_in - thick / r0)
        if box is None:
            return []
        x = _wrap(g.theta[box] - theta0) / half
        if lesion.subtype == "epidural":  # biconvex lens
            prof = np.sqrt(np.clip(1.0 - x * x, 0.0, 1.0))
        else:  # crescent: long, of nearly even thickness, tapering at its ends
            prof = np.clip(1.0 - np.abs(x) ** 3, 0.0, 1.0)
        below = (rho_in - g.rho0[box]) * r0  # mm below the inner table
        frac = soft((thick * prof - below) / g.pix) * soft(below / g.pix) * (prof > 0)
        return [(box, frac)]
    if lesion.subtype == "subarachnoid":
        parts = []
        theta0 = p["theta"] + p["drift"] * (k - mid)
        half = p["half"] * (0.6 + 0.4 * size)
        box = g.arc_box(theta0, half, rho_in + 0.01, rho_in - 13.0 / r0)
        if box is not None:
            x = _wrap(g.theta[box] - theta0) / half
            sector = np.clip(1.0 - x * x, 0.0, 1.0)
            parts.append((box, sector * _sulcal_fraction(g, box, band, phase, max(3.0, 1.2 * g.pix))))
        if p["basal"]:
            t = float(g.st.t[k])
            for cbox, cfrac in _cistern_parts(g, t):
                parts.append((cbox, cfrac))
        return parts
    if lesion.subtype == "intraparenchymal":
        uc = p["u"] + p["du"] * (k - mid)
        vc = p["v"] + p["dv"] * (k - mid)
        radius = p["radius"] * size + grow_mm
        box = g.ellipse_box(uc, vc, 1.35 * radius, 1.35 * radius)
        if box is None:
            return []
        du, dv = g.u[box] - uc, g.v[box] - vc
        r = np.hypot(du, dv)
        phi = np.arctan2(dv, du)
        edge = radius * (1.0 + 0.18 * np.cos(2 * phi + p["p2"]) + 0.08 * np.cos(3 * phi + p["p3"]))
        frac = soft((edge - r) / g.pix) * _brain_fraction(g, box, s, d)
        return [(box, frac)]
    if lesion.subtype == "intraventricular":
        parts = []
        t = float(g.st.t[k])
        for i, (box, vfrac) in enumerate(_ventricle_parts(g, t)[:2]):
            if p["sides"] != 2 and i != p["sides"]:
                continue
            v = g.v[box]
            # Blood layers in the dependent (posterior) part; `fill` 1 is a cast of the ventricle.
            vb = v[vfrac > 0.5]
            if vb.size == 0:
                continue
            level = vb.max() - p["fill"] * (0.4 + 0.6 * size) * (vb.max() - vb.min())
            parts.append((box, vfrac * soft((v - level) / g.pix)))
        return parts
    raise ValueError(f"unknown subtype {lesion.subtype!r}")


def bank_size(rows: int, cols: int) -> int:
    """The side of the random fields that every study of this image size cuts its slices from."""
    return 2 * max(rows, cols)


def render_study(
    st: Study, banks: RandomFields, with_masks: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yield (hu, lesion pixel counts, masks) slice by slice (cache-friendly, bounded memory)."""
    g = Grid(st, banks)
    for k in range(st.n_slices):
        oy, ox, sign = (int(x) for x in st.noise_offsets[k])
        noise = banks.noise[oy : oy + st.rows, ox : ox + st.cols]
        yield _render_slice(g, k, noise if sign > 0 else -noise, with_masks)
