"""What a head-CT phantom study is, drawn before anything is rendered: anatomy, geometry, lesions.

Every lesion spans a run of adjacent slices, faint and small at both ends of the run; single-slice
faint hyperdensities (mimics) appear in negative slices, so an end slice alone is ambiguous and its
neighbours decide. Anatomy and lesions are in millimetres, so a seed gives the same study at any
image size. `render.py` turns a `Study` into HU; `phantom.py` and `archive.py` use both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ichdata.labels import CLASSES

__all__ = [
    "SUBTYPES",
    "Anatomy",
    "Lesion",
    "Study",
    "draw_anatomy",
    "draw_study",
    "head_scale",
    "study_labels",
    "without_lesions",
]

SUBTYPES: tuple[str, ...] = CLASSES[:5]
"""The five hemorrhage subtypes, in label-column order (`any` is their OR)."""

_HEAD_HEIGHT_MM = 1.45 * 95.0  # skull base to vertex, the span of t = 0..1

# Where along the head (t: 0 skull base, 1 vertex) each subtype may be drawn: the extent of the
# anatomy it lives in (intraventricular only where the lateral ventricles are large enough).
_ALLOWED_T: dict[str, tuple[float, float]] = {
    "epidural": (0.18, 0.88),
    "intraparenchymal": (0.22, 0.80),
    "intraventricular": (0.34, 0.64),
    "subarachnoid": (0.16, 0.90),
    "subdural": (0.15, 0.95),
}
# Which subtype spans the whole positive run of a study, and how often each other one joins it,
# chosen so that the slice-level subtype shares come out near RSNA's (RSNA-FACTS.md).
_MAIN_P = {
    "epidural": 0.03,
    "intraparenchymal": 0.25,
    "intraventricular": 0.12,
    "subarachnoid": 0.22,
    "subdural": 0.38,
}
_SECONDARY_P = {
    "epidural": 0.0,
    "intraparenchymal": 0.14,
    "intraventricular": 0.5,
    "subarachnoid": 0.22,
    "subdural": 0.16,
}
_BLOOD_HU = {
    "epidural": (62.0, 85.0),
    "intraparenchymal": (58.0, 82.0),
    "intraventricular": (55.0, 78.0),
    "subarachnoid": (55.0, 75.0),
    "subdural": (52.0, 80.0),
}


@dataclass(frozen=True)
class Anatomy:
    """What a patient keeps across studies: head size and shape, skull, ventricles, calcifications."""

    a: float  # head half-width (mm)
    b: float  # head half-length (mm)
    harmonics: tuple[tuple[int, float, float], ...]  # (k, amplitude, phase) outline perturbations
    bone: float  # skull density factor
    scalp: float  # mm
    skull: float  # mm
    csf: float  # extra-axial CSF space (mm), larger with atrophy
    ventricles: float  # ventricle size factor
    choroid_calcified: bool
    pineal_calcified: bool

    @property
    def r0(self) -> float:
        """The head's mean radius (mm)."""
        return float(np.sqrt(self.a * self.b))

    def outline(self, theta: np.ndarray) -> np.ndarray:
        """1 + the outline perturbation at elliptic angle `theta`."""
        out = np.ones_like(theta)
        for k, amp, phase in self.harmonics:
            out = out + amp * np.cos(k * theta + phase)
        return out


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """One patient's anatomy."""
    return Anatomy(
        a=float(rng.uniform(66, 76)),
        b=float(rng.uniform(85, 97)),
        harmonics=tuple(
            (k, float(rng.uniform(0, 0.03 / k)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 4)
        ),
        bone=float(rng.uniform(0.85, 1.05)),
        scalp=float(rng.uniform(3.5, 6.0)),
        skull=float(rng.uniform(5.5, 8.0)),
        csf=float(rng.uniform(0.8, 3.0)),
        ventricles=float(rng.uniform(0.75, 1.5)),
        choroid_calcified=bool(rng.random() < 0.4),
        pineal_calcified=bool(rng.random() < 0.3),
    )


@dataclass(frozen=True)
class Lesion:
    """One hemorrhage: its subtype, its run of slices and its geometry."""

    subtype: str
    first: int
    last: int  # inclusive
    blood: float  # HU of the fully resolved blood
    alpha_end: tuple[float, float]  # contrast on the end slices of the run and the ones next to them
    p: dict[str, float]  # geometry


@dataclass(frozen=True)
class Study:
    """Everything random about one series, drawn before it is rendered."""

    anatomy: Anatomy
    rows: int
    cols: int
    spacing: float  # mm per pixel
    yaw: float
    cx: float
    cy: float
    t: np.ndarray  # (T,) position along the head, 0 skull base .. 1 vertex
    z: np.ndarray  # (T,) table position (mm)
    noise_sd: float
    sulcal_phase: float
    field_offset: tuple[int, int]
    noise_offsets: np.ndarray  # (T, 3): row, col, sign
    lesions: tuple[Lesion, ...]
    mimics: tuple[tuple[float, float, float, float] | None, ...]  # per slice: u, v, radius, +HU

    @property
    def n_slices(self) -> int:
        """The number of slices."""
        return len(self.t)


def head_scale(t: float) -> float:
    """Cross-section scale of the head at height t (0 skull base, 1 vertex): an ellipsoid."""
    zn = -0.5 + 1.45 * t
    return float(np.sqrt(max(1.0 - zn * zn, 0.05)))


def _allowed_slices(subtype: str, t: np.ndarray) -> tuple[int, int] | None:
    lo, hi = _ALLOWED_T[subtype]
    ks = np.flatnonzero((t >= lo) & (t <= hi))
    return (int(ks[0]), int(ks[-1])) if ks.size else None


def _make_lesion(
    rng: np.random.Generator, subtype: str, first: int, last: int, st_t: np.ndarray, an: Anatomy
) -> Lesion:
    """Geometry of one lesion whose run is slices first..last."""
    p: dict[str, float] = {}
    if subtype in ("epidural", "subdural"):
        p["theta"] = float(np.pi * rng.integers(2) + rng.uniform(-1.0, 1.0))
        p["drift"] = float(rng.uniform(-0.04, 0.04))
        if subtype == "epidural":
            p["half"], p["thick"] = float(rng.uniform(0.30, 0.55)), float(rng.uniform(9.0, 20.0))
        else:
            p["half"], p["thick"] = float(rng.uniform(0.7, 1.2)), float(rng.uniform(4.5, 12.0))
    elif subtype == "subarachnoid":
        p["theta"] = float(rng.uniform(0, 2 * np.pi))
        p["drift"] = float(rng.uniform(-0.04, 0.04))
        p["half"] = float(rng.uniform(0.5, 1.1))
        p["basal"] = float(st_t[first] < 0.40 and rng.random() < 0.6)
    elif subtype == "intraparenchymal":
        s_min = min(head_scale(float(x)) for x in st_t[first : last + 1])
        room_u, room_v = s_min * an.a - 16.0, s_min * an.b - 16.0
        phi, f = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5)
        p["u"], p["v"] = float(f * room_u * np.cos(phi)), float(f * room_v * np.sin(phi))
        p["radius"] = float(min(rng.uniform(6.0, 18.0), 0.4 * room_u))
        p["du"], p["dv"] = float(rng.uniform(-0.8, 0.8)), float(rng.uniform(-0.8, 0.8))
        p["p2"], p["p3"] = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))
        p["edema"] = float(rng.uniform(2.0, 5.0))
    elif subtype == "intraventricular":
        p["sides"] = float(rng.choice([0, 1, 2], p=[0.3, 0.3, 0.4]))
        p["fill"] = 1.0 if rng.random() < 0.15 else float(rng.uniform(0.3, 0.7))
    else:
        raise ValueError(f"unknown subtype {subtype!r}; expected one of {', '.join(SUBTYPES)}")
    lo, hi = _BLOOD_HU[subtype]
    return Lesion(
        subtype=subtype,
        first=first,
        last=last,
        blood=float(rng.uniform(lo, hi)),
        alpha_end=(float(rng.uniform(0.2, 0.4)), float(rng.uniform(0.5, 0.75))),
        p=p,
    )


def _draw_lesion_plan(
    rng: np.random.Generator, t: np.ndarray, an: Anatomy, coverage: float
) -> tuple[Lesion, ...]:
    """A positive study: one lesion spans the whole positive run (about `coverage` of the slices).

    Others join it on sub-runs; the union of the runs is the main run.
    """
    n = len(t)
    names = list(SUBTYPES)
    probs = np.array([_MAIN_P[x] for x in names])
    if coverage > 0.6:  # only the convexity lesions span most of a head
        probs = probs * np.array([x in ("subdural", "subarachnoid") for x in names])
    main = str(rng.choice(names, p=probs / probs.sum()))
    allowed = _allowed_slices(main, t) or (0, n - 1)
    room = allowed[1] - allowed[0] + 1
    length = int(np.clip(round(coverage * n), min(3, room), room))
    first = allowed[0] + int(rng.integers(0, room - length + 1))
    last = first + length - 1
    lesions = [_make_lesion(rng, main, first, last, t, an)]
    for sub in names:
        if sub == main or rng.random() >= _SECONDARY_P[sub]:
            continue
        rng_sub = _allowed_slices(sub, t)
        if rng_sub is None:
            continue
        lo, hi = max(first, rng_sub[0]), min(last, rng_sub[1])
        if hi - lo + 1 < 2:
            continue
        m = max(2, round(rng.uniform(0.35, 0.9) * (hi - lo + 1)))
        f = lo + int(rng.integers(0, hi - lo + 1 - m + 1))
        lesions.append(_make_lesion(rng, sub, f, f + m - 1, t, an))
    return tuple(lesions)


def _placed_lesions(
    rng: np.random.Generator, runs: Sequence[tuple[str, int, int]], t: np.ndarray, an: Anatomy
) -> tuple[Lesion, ...]:
    """Lesions on explicit (subtype, first, last) runs; ValueError for a run where its subtype cannot occur."""
    n_slices = len(t)
    plan: list[Lesion] = []
    for subtype, first, last in runs:
        if subtype not in SUBTYPES:
            raise ValueError(f"unknown subtype {subtype!r}; expected one of {', '.join(SUBTYPES)}")
        allowed = _allowed_slices(subtype, t)
        if allowed is None or not allowed[0] <= first <= last <= allowed[1]:
            raise ValueError(
                f"{subtype} run {first}..{last} is outside the slices where it can occur "
                f"({allowed[0]}..{allowed[1]} of {n_slices})"
                if allowed
                else f"{subtype} cannot occur in a {n_slices}-slice series"
            )
        plan.append(_make_lesion(rng, subtype, int(first), int(last), t, an))
    return tuple(plan)


def _draw_mimics(
    rng: np.random.Generator, t: np.ndarray, an: Anatomy
) -> tuple[tuple[float, float, float, float] | None, ...]:
    """Per slice, a faint single-slice hyperdensity (u, v, radius, +HU) on about a quarter of them."""
    mimics: list[tuple[float, float, float, float] | None] = []
    for k in range(len(t)):
        if rng.random() < 0.25:
            s = head_scale(float(t[k]))
            mimics.append(
                (
                    float(rng.uniform(-0.4, 0.4) * an.a * s),
                    float(rng.uniform(-0.4, 0.4) * an.b * s),
                    float(rng.uniform(4.0, 12.0)),
                    float(rng.uniform(6.0, 14.0)),
                )
            )
        else:
            mimics.append(None)
    return tuple(mimics)


def draw_study(
    rng: np.random.Generator,
    an: Anatomy,
    *,
    rows: int,
    cols: int,
    n_slices: int,
    bank_size: int,
    lesions: Sequence[tuple[str, int, int]] | None,
    coverage: float,
) -> Study:
    """Geometry, noise and lesions of one study.

    `lesions` None draws a positive plan of about `coverage` of the slices; a sequence gives
    explicit (subtype, first, last) runs (`()`: none). The draws happen in one fixed order, so a
    generator in a given state always gives the same study.
    """
    fov = rng.uniform(220.0, 250.0)
    spacing = float(fov / max(rows, cols))
    t_lo, t_hi = rng.uniform(-0.03, 0.05), rng.uniform(0.92, 0.99)
    t = np.linspace(t_lo, t_hi, n_slices)
    thickness = (t_hi - t_lo) * _HEAD_HEIGHT_MM / max(n_slices - 1, 1)
    z = rng.uniform(-80.0, -40.0) + thickness * np.arange(n_slices)
    plan = (
        _draw_lesion_plan(rng, t, an, coverage) if lesions is None else _placed_lesions(rng, lesions, t, an)
    )
    mimics = _draw_mimics(rng, t, an)
    noise_offsets = np.stack(
        [
            rng.integers(0, bank_size - rows + 1, n_slices),
            rng.integers(0, bank_size - cols + 1, n_slices),
            rng.choice([-1, 1], n_slices),
        ],
        axis=1,
    )
    return Study(
        anatomy=an,
        rows=rows,
        cols=cols,
        spacing=spacing,
        yaw=float(rng.uniform(-0.15, 0.15)),
        cx=float(rng.uniform(-6.0, 6.0)),
        cy=float(rng.uniform(-8.0, 8.0)),
        t=t,
        z=z,
        noise_sd=float(rng.uniform(3.0, 6.5)),
        sulcal_phase=float(rng.uniform(0, 2 * np.pi)),
        field_offset=(int(rng.integers(0, bank_size - rows + 1)), int(rng.integers(0, bank_size - cols + 1))),
        noise_offsets=noise_offsets,
        lesions=plan,
        mimics=mimics,
    )


def study_labels(st: Study) -> np.ndarray:
    """The (T, 6) uint8 labels of a study's slices, columns `CLASSES` (`any` is the OR of the subtypes)."""
    labels = np.zeros((st.n_slices, len(CLASSES)), dtype=np.uint8)
    for lesion in st.lesions:
        labels[lesion.first : lesion.last + 1, SUBTYPES.index(lesion.subtype)] = 1
    labels[:, -1] = labels[:, :-1].max(axis=1)
    return labels


def without_lesions(st: Study) -> Study:
    """The same study with no hemorrhage (its mimics stay)."""
    return replace(st, lesions=())
