"""Synthetic head-CT DICOM: the project's one DICOM writer, head-CT phantoms, and an RSNA-format archive.

- `write_ct_slice` writes one CT slice with exactly the header a test asks for (tilted or coronal
  geometry, the RSNA 12-bit quirk, RescaleSlope ≠ 1, signed or unsigned, non-square, no
  InstanceNumber, multi-valued WindowCenter, `ID_` UIDs, compressed transfer syntaxes). Every
  stage's tests make their inputs with it, so one place knows how to write a DICOM file.
- `stored_from_hu` turns HU into the stored values a scanner writes under a given header, including
  the broken RSNA 12-bit encoding that DESIGN.md's correction undoes.
- `phantom_series` draws a head-CT series (skull, brain, CSF, ventricles, cisterns, calcifications,
  noise) with hemorrhages where each subtype occurs, as NumPy arrays with per-slice labels.
- `write_archive` (`ich synth`) writes many such series as an RSNA-format archive: flat
  `ID_<hex>.dcm` files and `stage_2_train.csv`, with RSNA's header quirks.

Phantom design, for the models trained on it: every lesion spans a run of adjacent slices and is
faint and small at both ends of its run (a partial volume of blood), while single-slice faint
hyperdensities (mimics) and bright calcifications appear in negative slices. An end slice alone is
therefore ambiguous, and its neighbours decide: context across slices (a CNN-RNN) pays. Anatomy and
lesions are drawn in millimetres, so a seed gives the same series at any image size.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import config as _dicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import format_number_as_ds

from ichdata.errors import UserError
from ichdata.labels import CLASSES

__all__ = [
    "SUBTYPES",
    "ArchiveSummary",
    "Phantom",
    "add_reference_sequence",
    "phantom_series",
    "stored_from_hu",
    "write_archive",
    "write_ct_slice",
]

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_IGNORE = _dicom_config.IGNORE


def _ds(x: float) -> str:
    """A decimal string (VR DS, at most 16 characters) for one number."""
    x = float(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return format_number_as_ds(x)


def _ds_multi(values: float | str | Sequence[float | str]) -> str | list[str]:
    """One or several decimal strings; strings pass unchanged (RSNA's `00036`)."""
    if isinstance(values, str):
        return values
    if isinstance(values, int | float | np.integer | np.floating):
        return _ds(float(values))
    out = [v if isinstance(v, str) else _ds(v) for v in values]
    return out[0] if len(out) == 1 else out


@functools.cache
def _tag_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword")
    return tag, dictionary_VR(tag)


def _put(ds: Dataset, keyword: str, value: Any, vr: str | None = None) -> None:
    """Set an element without pydicom's value validation: `ID_…` UIDs are not valid UIDs (RSNA's
    quirk, reproduced on purpose), and tests write deliberately odd values through `extra`."""
    tag, default_vr = _tag_vr(keyword)
    ds[tag] = DataElement(tag, vr or default_vr, value, validation_mode=_IGNORE)


def stored_from_hu(
    hu: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    bits_stored: int = 16,
    pixel_representation: int = 1,
) -> np.ndarray:
    """The stored pixel values a scanner writes for `hu` under this header (int16 or uint16).

    Normally `round((hu - intercept) / slope)`, clipped to what `bits_stored` bits of the given
    `(0028,0103) Pixel Representation` hold. Under RSNA's broken header — `(0028,0101) Bits Stored`
    12, unsigned, `(0028,1052) Rescale Intercept` > -100 — the values are the ones RSNA shipped:
    `hu mod 4096` (hu clipped to [-1000, 3095]), which DESIGN.md's correction (add 1000, subtract
    4096 from values ≥ 4096, intercept -1000) turns back into `hu`.
    """
    hu = np.asarray(hu)
    if bits_stored == 12 and pixel_representation == 0 and intercept > -100:
        h = np.clip(np.rint(hu), -1000, 3095).astype(np.int32)
        return np.mod(h, 4096).astype(np.uint16)
    if pixel_representation:
        lo, hi, dtype = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1, "<i2"
    else:
        lo, hi, dtype = 0, 2**bits_stored - 1, "<u2"
    values = (hu - intercept) / slope if slope != 1.0 else hu - intercept
    return np.clip(np.rint(values), lo, hi).astype(dtype)


def write_ct_slice(
    path: str | os.PathLike[str],
    stored: np.ndarray,
    *,
    image_id: str,
    study_uid: str,
    series_uid: str,
    patient_id: str,
    image_position: Sequence[float],
    image_orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (0.48828125, 0.48828125),
    slope: float = 1.0,
    intercept: float = -1024.0,
    bits_stored: int = 16,
    pixel_representation: int = 1,
    instance_number: int | None = None,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    window_center: float | str | Sequence[float | str] | None = 40.0,
    window_width: float | str | Sequence[float | str] | None = 80.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write one single-frame CT slice as a DICOM Part 10 file (preamble, `DICM`, file meta).

    `stored` is the 2-D array of stored values, (rows, cols) = `(0028,0010) Rows`,
    `(0028,0011) Columns`; it must fit `bits_stored` bits signed (`pixel_representation=1`) or
    unsigned (0) — use `stored_from_hu` to make it from HU. `image_id` becomes the
    `(0008,0018) SOP Instance UID` (RSNA: `ID_<hex>`, the file stem), `image_position` and
    `image_orientation` the `(0020,0032)`/`(0020,0037)` geometry (tilted and coronal series are just
    other values), `slope`/`intercept` `(0028,1053)`/`(0028,1052)`. `instance_number=None` leaves
    `(0020,0013) Instance Number` out, `window_center`/`window_width` may be multi-valued (RSNA's
    `[40, 40]`) or None (left out). `transfer_syntax` may be any uncompressed little-endian syntax,
    Explicit VR Big Endian, or a compressed one that pydicom can encode with what is installed (RLE
    Lossless always; JPEG 2000 lossless with pylibjpeg-openjpeg; JPEG-LS with pyjpegls).

    `extra` maps DICOM keywords to values set last, overriding the above; None removes the element.
    Tests use it to write broken files on purpose, e.g. `{"ImagePositionPatient": None}`,
    `{"Rows": 600}` (pixel data size mismatch), `{"SamplesPerPixel": 3}`, `{"NumberOfFrames": 2}`.
    """
    arr = np.asarray(stored)
    if arr.ndim != 2:
        raise ValueError(f"stored must be 2-D (rows, cols), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"stored must hold integers, got {arr.dtype}; use stored_from_hu()")
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 1..16, got {bits_stored}")
    if pixel_representation not in (0, 1):
        raise ValueError(f"pixel_representation must be 0 or 1, got {pixel_representation}")
    if pixel_representation:
        lo, hi, dtype = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1, "<i2"
    else:
        lo, hi, dtype = 0, 2**bits_stored - 1, "<u2"
    if arr.size:
        amin, amax = int(arr.min()), int(arr.max())
        if amin < lo or amax > hi:
            raise ValueError(
                f"stored values {amin}..{amax} do not fit {bits_stored} bits "
                f"{'signed' if pixel_representation else 'unsigned'} ({lo}..{hi})"
            )
    ts = UID(transfer_syntax)
    if ts == ExplicitVRBigEndian:
        dtype = ">" + dtype[1:]
    arr = np.ascontiguousarray(arr, dtype=dtype)
    rows, cols = arr.shape

    meta = FileMetaDataset()
    _put(meta, "MediaStorageSOPClassUID", CTImageStorage)
    _put(meta, "MediaStorageSOPInstanceUID", image_id)
    _put(meta, "TransferSyntaxUID", ExplicitVRLittleEndian if ts.is_compressed else ts)
    _put(meta, "ImplementationClassUID", PYDICOM_IMPLEMENTATION_UID)
    _put(meta, "ImplementationVersionName", "ICH_SYNTH")

    ds = Dataset()
    ds.file_meta = meta
    _put(ds, "ImageType", list(image_type))
    _put(ds, "SOPClassUID", CTImageStorage)
    _put(ds, "SOPInstanceUID", image_id)
    _put(ds, "Modality", modality)
    _put(ds, "PatientID", patient_id)
    _put(ds, "StudyInstanceUID", study_uid)
    _put(ds, "SeriesInstanceUID", series_uid)
    if instance_number is not None:
        _put(ds, "InstanceNumber", str(int(instance_number)))
    _put(ds, "ImagePositionPatient", [_ds(v) for v in image_position])
    _put(ds, "ImageOrientationPatient", [_ds(v) for v in image_orientation])
    _put(ds, "SamplesPerPixel", 1)
    _put(ds, "PhotometricInterpretation", "MONOCHROME2")
    _put(ds, "Rows", rows)
    _put(ds, "Columns", cols)
    _put(ds, "PixelSpacing", [_ds(v) for v in pixel_spacing])
    _put(ds, "BitsAllocated", 16)
    _put(ds, "BitsStored", bits_stored)
    _put(ds, "HighBit", bits_stored - 1)
    _put(ds, "PixelRepresentation", pixel_representation)
    if window_center is not None:
        _put(ds, "WindowCenter", _ds_multi(window_center))
    if window_width is not None:
        _put(ds, "WindowWidth", _ds_multi(window_width))
    _put(ds, "RescaleIntercept", _ds(intercept))
    _put(ds, "RescaleSlope", _ds(slope))
    _put(ds, "RescaleType", "HU")
    _put(ds, "PixelData", arr.tobytes(), vr="OW")

    if ts.is_compressed:
        # pydicom 3's encoders (RLE natively, JPEG 2000 via pylibjpeg-openjpeg, JPEG-LS via pyjpegls);
        # the SOP Instance UID must stay the image id.
        ds.compress(ts, arr.astype(dtype.replace("<", "="), copy=False), generate_instance_uid=False)
    elif ts not in (*_UNCOMPRESSED, ExplicitVRBigEndian):
        raise ValueError(f"transfer syntax {ts} ({ts.name}) is not one write_ct_slice can write")

    for keyword, value in (extra or {}).items():
        if value is None:
            tag = tag_for_keyword(keyword)
            if tag is not None and tag in ds:
                del ds[tag]
        else:
            _put(ds, keyword, value)

    # dcmwrite deep-copies the file meta, which re-validates the `ID_…` UIDs: not valid DICOM UIDs,
    # written on purpose (RSNA's quirk), so validation is off for the write.
    with _dicom_config.disable_value_validation():
        dcmwrite(path, ds, enforce_file_format=True)


def add_reference_sequence(path: str | os.PathLike[str], *, undefined_length: bool = False) -> Path:
    """Insert a two-level sequence (Referenced Image Sequence with a coded purpose, and an empty item)
    before the pixel data of the file at `path`, as hospital exports have: of defined length, or of
    undefined length with delimiters. Returns the path."""
    with _dicom_config.disable_value_validation():  # the RSNA-style `ID_…` UIDs are rewritten as they are
        ds = dcmread(path)
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator = "113100", "DCM"
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3.4"
        item.PurposeOfReferenceCodeSequence = DicomSequence([inner])
        ds.ReferencedImageSequence = DicomSequence([item, Dataset()])
        for elem in (ds["ReferencedImageSequence"], item["PurposeOfReferenceCodeSequence"]):
            elem.is_undefined_length = undefined_length
        for it in (item, inner):
            it.is_undefined_length_sequence_item = undefined_length
        ds.save_as(path, enforce_file_format=True)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Head-CT phantoms
#
# Coordinates: the head frame (u, v) in mm, u = left-right, v = anterior (-) to posterior (+), which
# is the image's row direction, so the occiput (where blood layers in a supine patient) is at the
# bottom of the image. The head is an ellipsoid-like shape whose cross-section shrinks from the skull
# base (t = 0) to the vertex (t = 1); `rho0` is the normalised elliptic radius of a pixel, so a
# point lies at depth `(s_t - rho0) * R0` mm below the scalp on a slice of cross-section scale s_t.
# That makes every layer (scalp, skull tables, CSF, cortex, white matter) one lookup in a per-slice
# radial profile over a per-study index array: the volume costs a few whole-frame operations per
# slice, and the smaller structures (ventricles, cisterns, lesions) are drawn in their bounding boxes.
# --------------------------------------------------------------------------------------------------

SUBTYPES: tuple[str, ...] = CLASSES[:5]
"""The five hemorrhage subtypes, in label-column order (`any` is their OR)."""

_AIR, _CSF, _GREY, _WHITE, _FAT = -1000.0, 7.0, 38.0, 29.0, -90.0
_K = 4096  # radial lookup-table bins
_RHO0_MAX = 1.3  # normalised radius covered by the table; beyond it, air
_SULCAL_WAVELENGTH_MM = 15.0

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
# chosen so that slice-level subtype shares come out near RSNA's (RSNA-FACTS.md): of the positive
# slices, subdural ~44 %, intraparenchymal ~33 %, subarachnoid ~33 %, intraventricular ~24 %,
# epidural ~3 %.
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
class _Anatomy:
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
        return float(np.sqrt(self.a * self.b))

    def outline(self, theta: np.ndarray) -> np.ndarray:
        """1 + the outline perturbation at elliptic angle `theta`."""
        out = np.ones_like(theta)
        for k, amp, phase in self.harmonics:
            out = out + amp * np.cos(k * theta + phase)
        return out


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    return _Anatomy(
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
class _Lesion:
    subtype: str
    first: int
    last: int  # inclusive
    blood: float  # HU of the fully resolved blood
    alpha_end: tuple[float, float]  # contrast on the end slices of the run and the ones next to them
    p: dict[str, float]  # geometry


@dataclass(frozen=True)
class _Study:
    anatomy: _Anatomy
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
    lesions: tuple[_Lesion, ...]
    mimics: tuple[tuple[float, float, float, float] | None, ...]  # per slice: u, v, radius, +HU

    @property
    def n_slices(self) -> int:
        return len(self.t)


def _run_profile(lesion: _Lesion, k: int) -> tuple[float, float]:
    """(contrast, size) of a lesion on slice k of its run: faint and small at the ends, as a partial
    volume of blood would be, so that an end slice alone is ambiguous and its neighbours decide."""
    n = lesion.last - lesion.first + 1
    e = min(k - lesion.first, lesion.last - k)
    alpha = lesion.alpha_end[0] if e == 0 else lesion.alpha_end[1] if e == 1 else 1.0
    size = 0.45 + 0.55 * float(np.sin(np.pi * (k - lesion.first + 0.5) / n))
    return alpha, size


class _Banks:
    """Per-archive random fields, cut at per-study/per-slice offsets: band-passed fields whose zero
    crossings are the sulci, and spatially correlated CT noise. Computing them once keeps each slice
    to a few array operations."""

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


class _Grid:
    """Per-study coordinate arrays: the head frame of every pixel, its elliptic radius and angle, and
    the radial lookup index."""

    def __init__(self, st: _Study, banks: _Banks) -> None:
        an = st.anatomy
        x = (np.arange(st.cols, dtype=np.float32) - (st.cols - 1) / 2) * st.spacing - st.cx
        y = (np.arange(st.rows, dtype=np.float32) - (st.rows - 1) / 2) * st.spacing - st.cy
        c, s = np.float32(np.cos(st.yaw)), np.float32(np.sin(st.yaw))
        self.u = c * x[None, :] + s * y[:, None]
        self.v = -s * x[None, :] + c * y[:, None]
        self.theta = np.arctan2(self.v / an.b, self.u / an.a).astype(np.float32)
        self.rho0 = (np.hypot(self.u / an.a, self.v / an.b) * an.outline(self.theta)).astype(np.float32)
        self.idx = np.minimum((self.rho0 * np.float32(_K / _RHO0_MAX)).astype(np.int32), _K - 1)
        oy, ox = st.field_offset
        self.f1 = banks.sulci[0, oy : oy + st.rows, ox : ox + st.cols]
        self.f2 = banks.sulci[1, oy : oy + st.rows, ox : ox + st.cols]
        self.sulcal_gain = np.float32(banks.sulcal_gain)
        self.sulcal_per_mm = banks.sulcal_per_mm
        self.st = st
        self.pix = st.spacing

    def box(self, us: np.ndarray, vs: np.ndarray, margin_mm: float = 2.0) -> tuple[slice, slice] | None:
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

    def ellipse_box(self, uc: float, vc: float, ra: float, rb: float, margin_mm: float = 2.0):
        us = np.array([uc - ra, uc + ra, uc - ra, uc + ra])
        vs = np.array([vc - rb, vc - rb, vc + rb, vc + rb])
        return self.box(us, vs, margin_mm)

    def arc_box(self, theta0: float, half: float, rho_outer: float, rho_inner: float):
        """Bounding box of the band between two elliptic radii over an angular range."""
        an = self.st.anatomy
        th = np.linspace(theta0 - half, theta0 + half, 13)
        rr = np.concatenate([np.full(13, rho_outer), np.full(13, max(rho_inner, 0.0))])
        th2 = np.concatenate([th, th])
        scale = rr / an.outline(th2)
        return self.box(scale * an.a * np.cos(th2), scale * an.b * np.sin(th2))


def _soft(signed_distance_px: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a pixel whose centre lies `signed_distance_px` inside an edge."""
    return np.clip(signed_distance_px + 0.5, 0.0, 1.0)


def _scale(t: float) -> float:
    """Cross-section scale of the head at height t (0 skull base, 1 vertex): an ellipsoid."""
    zn = -0.5 + 1.45 * t
    return float(np.sqrt(max(1.0 - zn * zn, 0.05)))


def _depths(an: _Anatomy, t: float, s: float) -> dict[str, float]:
    """Depths (mm below the scalp surface) of the layer boundaries on a slice. Skull looks thicker
    where the slice cuts it obliquely (base and vertex) and is thicker at the base."""
    oblique = min(1.0 / max(s, 0.3) ** 0.6, 1.8)
    skull = an.skull * oblique * (1.0 + 0.5 * max(0.0, 0.2 - t) / 0.2)
    outer = an.scalp
    inner = outer + skull
    return {"outer": outer, "inner": inner, "cortex": inner + an.csf, "white": inner + an.csf + 3.0}


def _radial_tables(st: _Study, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, float], float]:
    """The slice's radial profile (HU per lookup bin) and the sulcal band weight per bin."""
    an = st.anatomy
    t = float(st.t[k])
    s = _scale(t)
    d = _depths(an, t, s)
    r0 = an.r0
    rho = (np.arange(_K, dtype=np.float64) + 0.5) * (_RHO0_MAX / _K)
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
    w = max(1, round(st.spacing / (_RHO0_MAX * r0 / _K)))
    if w > 1:
        c = np.concatenate([[0.0], np.cumsum(prof)])
        lo = np.clip(np.arange(_K) - w // 2, 0, _K)
        hi = np.clip(lo + w, 0, _K)
        prof = (c[hi] - c[lo]) / (hi - lo)
    # Sulci: open at the brain surface, tapering to nothing 12 mm deep.
    band = np.clip(1.0 - (depth - d["inner"]) / 12.0, 0.0, 1.0) * (depth > d["inner"])
    return prof.astype(np.float32), band.astype(np.float32), d, s


def _brain_fraction(g: _Grid, box: tuple[slice, slice], s: float, d: dict[str, float]) -> np.ndarray:
    """Fraction of each pixel in the box that lies inside the inner skull table."""
    depth_px = ((s - g.rho0[box]) * g.st.anatomy.r0 - d["inner"]) / g.pix
    return _soft(depth_px)


def _ellipse_fraction(
    g: _Grid, box, uc: float, vc: float, ra: float, rb: float, bend: float = 0.0
) -> np.ndarray:
    """Partial-volume fraction of an ellipse (optionally bent: its centre line u = uc + bend·(v-vc)²)."""
    du = g.u[box] - uc - bend * (g.v[box] - vc) ** 2
    dv = g.v[box] - vc
    q = np.sqrt((du / ra) ** 2 + (dv / rb) ** 2)
    return _soft((1.0 - q) * min(ra, rb) / g.pix)


def _blend(hu: np.ndarray, box, frac: np.ndarray, value: float | np.ndarray) -> None:
    view = hu[box]
    view += frac * (value - view)


def _ventricle_parts(g: _Grid, t: float) -> list[tuple[tuple[slice, slice], np.ndarray]]:
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


def _cistern_parts(g: _Grid, t: float) -> list[tuple[tuple[slice, slice], np.ndarray]]:
    """Basal cisterns (a ring around the midbrain) and the Sylvian fissures: where basal subarachnoid
    blood collects."""
    parts = []
    if 0.16 < t < 0.30:
        box = g.ellipse_box(0.0, 6.0, 15.0, 15.0)
        if box is not None:
            du, dv = g.u[box], g.v[box] - 6.0
            r = np.hypot(du, dv)
            phi = np.arctan2(dv, du)
            outer = 13.5 + 2.0 * np.cos(5 * phi)
            parts.append((box, _soft((r - 10.0) / g.pix) * _soft((outer - r) / g.pix)))
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
            frac = _soft((1.3 - across) / g.pix) * _soft(along / g.pix) * _soft((length - along) / g.pix)
            parts.append((box, frac))
    return parts


def _sulcal_fraction(g: _Grid, box, band: np.ndarray, phase: float, half_width_mm: float) -> np.ndarray:
    """Where the slice's sulcal field crosses zero, within the band: the sulci (or, wider, the
    blood-filled sulci of subarachnoid hemorrhage), `half_width_mm` each side at the surface."""
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


def _render_slice(
    g: _Grid, k: int, noise: np.ndarray, with_masks: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """HU of slice k (float32 rows×cols), lesion pixel counts per subtype (fraction ≥ 0.5) and,
    if asked, the per-subtype blood fractions (5, rows, cols)."""
    st = g.st
    an = st.anatomy
    t = float(st.t[k])
    prof, band, d, s = _radial_tables(st, k)
    hu = prof.take(g.idx)
    phase = st.sulcal_phase + 0.09 * float(st.z[k])
    head = g.arc_box(0.0, np.pi, s - d["inner"] / an.r0, 0.0)
    if head is not None:
        _blend(hu, head, _sulcal_fraction(g, head, band, phase, 0.8), _CSF)

    # Deep grey nuclei.
    if 0.28 < t < 0.46:
        for sign in (-1.0, 1.0):
            box = g.ellipse_box(sign * 15.0, 8.0, 8.0, 11.0)
            if box is not None:
                _blend(hu, box, 0.8 * _ellipse_fraction(g, box, sign * 15.0, 8.0, 8.0, 11.0), 36.0)
    # Interhemispheric fissure and falx (its slight hyperdensity is a classic mimic of blood).
    if t > 0.28:
        vmax = s * an.b
        box = g.box(np.array([-4.0, 4.0]), np.array([-vmax, vmax]))
        if box is not None:
            au = np.abs(g.u[box])
            keep = _brain_fraction(g, box, s, d)
            if t < 0.65:
                vb = g.v[box]
                keep = keep * _soft((np.maximum(-25.0 - vb, vb - 35.0)) / g.pix)
            _blend(hu, box, keep * _soft((1.4 - au) / g.pix), _CSF)
            _blend(hu, box, keep * min(1.0, 0.7 / g.pix) * _soft((0.35 - au) / g.pix), 75.0)
    for box, frac in _ventricle_parts(g, t):
        _blend(hu, box, frac, 5.0)
    for box, frac in _cistern_parts(g, t):
        _blend(hu, box, frac, _CSF)
    # Skull base: petrous ridges and sphenoid sinus; frontal sinus higher up.
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
                frac = _soft((w - across) / g.pix) * _soft(along / g.pix) * _soft((length - along) / g.pix)
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
    # Calcifications: choroid plexus in the atria, pineal gland (bright, but not blood).
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
    # A faint single-slice hyperdensity (beam hardening, a vessel, partial volume): a mimic of the
    # faint ends of a lesion run, which only the neighbouring slices tell apart.
    mimic = st.mimics[k]
    if mimic is not None:
        mu, mv, mr, mamp = mimic
        box = g.ellipse_box(mu, mv, mr, mr)
        if box is not None:
            frac = _ellipse_fraction(g, box, mu, mv, mr, 0.8 * mr) * _brain_fraction(g, box, s, d)
            hu[box] += mamp * frac

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

    hu += st.noise_sd * noise
    return hu, counts, masks


def _pad_to(frac: np.ndarray, box: tuple[slice, slice], big: tuple[slice, slice]) -> np.ndarray:
    """`frac` (defined on `box`) placed into the enclosing box `big`, zeros elsewhere."""
    out = np.zeros((big[0].stop - big[0].start, big[1].stop - big[1].start), dtype=frac.dtype)
    i0, j0 = box[0].start - big[0].start, box[1].start - big[1].start
    out[i0 : i0 + frac.shape[0], j0 : j0 + frac.shape[1]] = frac
    return out


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def _lesion_parts(
    g: _Grid,
    lesion: _Lesion,
    k: int,
    size: float,
    s: float,
    d: dict[str, float],
    band: np.ndarray,
    phase: float,
    grow_mm: float = 0.0,
) -> list[tuple[tuple[slice, slice], np.ndarray]]:
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
        frac = _soft((thick * prof - below) / g.pix) * _soft(below / g.pix) * (prof > 0)
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
        frac = _soft((edge - r) / g.pix) * _brain_fraction(g, box, s, d)
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
            parts.append((box, vfrac * _soft((v - level) / g.pix)))
        return parts
    raise ValueError(f"unknown subtype {lesion.subtype!r}")


# --------------------------------------------------------------------------------------------------
# Planning: anatomy, geometry and lesions of a study, drawn before anything is rendered
# --------------------------------------------------------------------------------------------------

_HEAD_HEIGHT_MM = 1.45 * 95.0  # skull base to vertex, the span of t = 0..1


def _allowed_slices(subtype: str, t: np.ndarray) -> tuple[int, int] | None:
    lo, hi = _ALLOWED_T[subtype]
    ks = np.flatnonzero((t >= lo) & (t <= hi))
    return (int(ks[0]), int(ks[-1])) if ks.size else None


def _make_lesion(
    rng: np.random.Generator, subtype: str, first: int, last: int, st_t: np.ndarray, an: _Anatomy
) -> _Lesion:
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
        s_min = min(_scale(float(x)) for x in st_t[first : last + 1])
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
    return _Lesion(
        subtype=subtype,
        first=first,
        last=last,
        blood=float(rng.uniform(lo, hi)),
        alpha_end=(float(rng.uniform(0.2, 0.4)), float(rng.uniform(0.5, 0.75))),
        p=p,
    )


def _draw_lesion_plan(
    rng: np.random.Generator, t: np.ndarray, an: _Anatomy, coverage: float
) -> tuple[_Lesion, ...]:
    """A positive study: one lesion spans the whole positive run (about `coverage` of the slices),
    others join it on sub-runs. The union of the runs is the main run."""
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


def _draw_study(
    rng: np.random.Generator,
    an: _Anatomy,
    *,
    rows: int,
    cols: int,
    n_slices: int,
    bank_size: int,
    lesions: Sequence[tuple[str, int, int]] | None,
    coverage: float,
) -> _Study:
    """Geometry, noise and lesions of one study. `lesions` None draws a positive plan of about
    `coverage` of the slices; a sequence gives explicit (subtype, first, last) runs ((): none)."""
    fov = rng.uniform(220.0, 250.0)
    spacing = float(fov / max(rows, cols))
    t_lo, t_hi = rng.uniform(-0.03, 0.05), rng.uniform(0.92, 0.99)
    t = np.linspace(t_lo, t_hi, n_slices)
    thickness = (t_hi - t_lo) * _HEAD_HEIGHT_MM / max(n_slices - 1, 1)
    z = rng.uniform(-80.0, -40.0) + thickness * np.arange(n_slices)
    if lesions is None:
        plan = _draw_lesion_plan(rng, t, an, coverage)
    else:
        plan_list = []
        for subtype, first, last in lesions:
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
            plan_list.append(_make_lesion(rng, subtype, int(first), int(last), t, an))
        plan = tuple(plan_list)
    mimics: list[tuple[float, float, float, float] | None] = []
    for k in range(n_slices):
        if rng.random() < 0.25:
            s = _scale(float(t[k]))
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
    noise_offsets = np.stack(
        [
            rng.integers(0, bank_size - rows + 1, n_slices),
            rng.integers(0, bank_size - cols + 1, n_slices),
            rng.choice([-1, 1], n_slices),
        ],
        axis=1,
    )
    return _Study(
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
        mimics=tuple(mimics),
    )


def _labels(st: _Study) -> np.ndarray:
    labels = np.zeros((st.n_slices, len(CLASSES)), dtype=np.uint8)
    for lesion in st.lesions:
        labels[lesion.first : lesion.last + 1, SUBTYPES.index(lesion.subtype)] = 1
    labels[:, -1] = labels[:, :-1].max(axis=1)
    return labels


def _bank_size(rows: int, cols: int) -> int:
    return 2 * max(rows, cols)


def _render_study(st: _Study, banks: _Banks, with_masks: bool = False):
    """Yield (hu, lesion pixel counts, masks) slice by slice (cache-friendly, bounded memory)."""
    g = _Grid(st, banks)
    for k in range(st.n_slices):
        oy, ox, sign = (int(x) for x in st.noise_offsets[k])
        noise = banks.noise[oy : oy + st.rows, ox : ox + st.cols]
        yield _render_slice(g, k, noise if sign > 0 else -noise, with_masks)


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
    an = _draw_anatomy(rng)
    size = _bank_size(rows, ncols)
    if isinstance(lesions, str):
        if lesions != "random":
            raise ValueError(
                f"lesions must be 'random' or a sequence of (subtype, first, last), got {lesions!r}"
            )
        runs = None
    else:
        runs = list(lesions)
    st = _draw_study(
        rng,
        an,
        rows=rows,
        cols=ncols,
        n_slices=n_slices,
        bank_size=size,
        lesions=runs,
        coverage=float(rng.uniform(0.15, 0.55)),
    )
    banks = _Banks(bank_rng, size, 240.0 / max(rows, ncols))
    hu = np.empty((n_slices, rows, ncols), dtype=np.float32)
    counts = np.zeros((n_slices, len(SUBTYPES)), dtype=np.int64)
    masks = np.zeros((n_slices, len(SUBTYPES), rows, ncols), dtype=np.float32) if with_masks else None
    for k, (h, c, m) in enumerate(_render_study(st, banks, with_masks)):
        hu[k], counts[k] = h, c
        if masks is not None and m is not None:
            masks[k] = m
    return Phantom(
        hu=hu,
        labels=_labels(st),
        lesion_pixels=counts,
        lesion_runs=tuple((x.subtype, x.first, x.last) for x in st.lesions),
        slice_z=st.z.copy(),
        pixel_spacing=st.spacing,
        masks=masks,
    )


# --------------------------------------------------------------------------------------------------
# The RSNA-format archive
# --------------------------------------------------------------------------------------------------

# Header styles seen in RSNA's archive, with the HU range each can store.
_HEADER_STYLES: tuple[tuple[str, float], ...] = (
    ("signed16", 0.45),  # BitsStored 16, signed, intercept -1024
    ("unsigned12", 0.35),  # BitsStored 12, unsigned, intercept -1024 (HU -1024..3071)
    ("rsna12", 0.12),  # BitsStored 12, unsigned, intercept 0 (or 1): RSNA's broken header
    ("unsigned16", 0.08),  # BitsStored 16, unsigned, intercept -1024
)
_STUDIES_PER_PATIENT = ((1, 0.6), (2, 0.3), (3, 0.1))
_RSNA_STUDY_POSITIVE_COVERAGE = 0.35  # mean fraction of slices with blood in a positive study


@dataclass(frozen=True)
class ArchiveSummary:
    """What `write_archive` wrote."""

    path: Path
    n_studies: int
    n_patients: int
    n_slices: int
    prevalence: dict[str, float]  # fraction of slices labelled positive, per class
    labels_csv: Path
    elapsed_s: float

    def __str__(self) -> str:
        rates = ", ".join(f"{name} {100 * rate:.1f} %" for name, rate in self.prevalence.items())
        speed = self.n_slices / self.elapsed_s if self.elapsed_s > 0 else float("inf")
        return (
            f"wrote {self.n_slices:,} slices ({self.n_studies:,} studies, {self.n_patients:,} patients) to "
            f"{self.path} in {self.elapsed_s:.1f} s ({speed:,.0f} slices/s); {rates}"
        )


def _unique_ids(rng: np.random.Generator, n: int, digits: int, taken: set[str]) -> list[str]:
    """`n` fresh RSNA-style ids `ID_<digits hex>`, distinct from each other and from `taken`."""
    out: list[str] = []
    while len(out) < n:
        for x in rng.integers(0, 16**digits, n - len(out), dtype=np.int64):
            name = f"ID_{int(x):0{digits}x}"
            if name not in taken:
                taken.add(name)
                out.append(name)
    return out


def _pick_positive(
    rng: np.random.Generator, counts: Sequence[int], n_total: int, prevalence: float
) -> set[int]:
    """Studies to make positive so that their positive slices come closest to `prevalence`: greedy
    over the studies in random order, each taken if it brings the total nearer the target."""
    target = prevalence * n_total
    chosen: set[int] = set()
    total = 0
    for i in rng.permutation(len(counts)):
        if abs(total + counts[i] - target) < abs(total - target):
            chosen.add(int(i))
            total += counts[i]
    return chosen


def write_archive(
    out: str | os.PathLike[str],
    *,
    studies: int,
    seed: int,
    any_prevalence: float = 0.14,
    image_size: int = 512,
) -> ArchiveSummary:
    """Write an RSNA-format synthetic head-CT archive: flat `ID_<hex>.dcm` files + `stage_2_train.csv`.

    One series per study, 20-40 slices each, 1-3 studies per patient; about `any_prevalence` of the
    slices show blood (RSNA: 0.14), with RSNA's subtype mix. File names are random ids, so their
    order says nothing about slice order. RSNA's header quirks are reproduced per series: 16-bit
    signed or 12/16-bit unsigned pixels, the broken 12-bit header with `(0028,1052) Rescale
    Intercept` 0 (stored values as RSNA shipped them; DESIGN.md's correction recovers HU), padding
    outside the reconstruction circle, multi-valued `(0028,1050) Window Center`, no
    `(0020,0013) Instance Number` (or numbers counting down), `ID_` UIDs and patient ids, a few
    gantry-tilted and non-square series. The same seed gives byte-identical files.
    """
    t_start = time.perf_counter()
    out = Path(out)
    if studies < 1:
        raise UserError(f"--studies must be at least 1, got {studies}")
    if not 0.0 <= any_prevalence <= 0.6:
        raise UserError(f"--prevalence must be between 0 and 0.6, got {any_prevalence}")
    if not 32 <= image_size <= 1024:
        raise UserError(f"--image-size must be between 32 and 1024, got {image_size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose a new one")
    out.mkdir(parents=True, exist_ok=True)

    root = np.random.SeedSequence(seed)
    plan_seq, bank_seq, study_seq = root.spawn(3)
    rng = np.random.default_rng(plan_seq)

    # Patients and their anatomy; studies assigned to patients in order.
    patient_of: list[int] = []
    anatomies: list[_Anatomy] = []
    while len(patient_of) < studies:
        n = int(rng.choice([x for x, _ in _STUDIES_PER_PATIENT], p=[p for _, p in _STUDIES_PER_PATIENT]))
        anatomies.append(_draw_anatomy(rng))
        patient_of.extend([len(anatomies) - 1] * n)
    patient_of = patient_of[:studies]
    n_patients = len(anatomies)

    # Per-series image geometry and header style.
    ncols = [image_size + image_size // 4 if rng.random() < 0.05 else image_size for _ in range(studies)]
    n_slices = [int(x) for x in rng.integers(20, 41, studies)]
    bank_size = _bank_size(image_size, image_size + image_size // 4)
    # Prevalence: above RSNA's, positive studies also get longer runs.
    coverage_mean = max(_RSNA_STUDY_POSITIVE_COVERAGE, 1.25 * any_prevalence)
    study_rngs = [np.random.default_rng(s) for s in study_seq.spawn(studies)]
    plans = []
    for i in range(studies):
        coverage = float(np.clip(rng.uniform(coverage_mean - 0.2, coverage_mean + 0.2), 0.1, 0.95))
        plans.append(
            _draw_study(
                study_rngs[i],
                anatomies[patient_of[i]],
                rows=image_size,
                cols=ncols[i],
                n_slices=n_slices[i],
                bank_size=bank_size,
                lesions=None,
                coverage=coverage,
            )
        )
    counts = [int(_labels(st)[:, -1].sum()) for st in plans]
    positive = _pick_positive(rng, counts, sum(n_slices), any_prevalence)
    plans = [st if i in positive else _without_lesions(st) for i, st in enumerate(plans)]

    taken: set[str] = set()
    patient_ids = _unique_ids(rng, n_patients, 8, taken)
    study_uids = _unique_ids(rng, studies, 10, taken)
    series_uids = _unique_ids(rng, studies, 10, taken)
    image_ids = [_unique_ids(rng, n, 9, taken) for n in n_slices]
    styles = [
        str(rng.choice([s for s, _ in _HEADER_STYLES], p=[p for _, p in _HEADER_STYLES]))
        for _ in range(studies)
    ]
    banks = _Banks(np.random.default_rng(bank_seq), bank_size, 240.0 / image_size)

    all_labels: list[tuple[str, np.ndarray]] = []
    for i, st in enumerate(plans):
        header = _series_header(rng, styles[i], st)
        labels = _labels(st)
        for k, (hu, _counts, _masks) in enumerate(_render_study(st, banks)):
            if header["pad"] is not None:
                hu[header["pad"]] = -2000.0
            stored = stored_from_hu(
                hu,
                intercept=header["intercept"],
                bits_stored=header["bits_stored"],
                pixel_representation=header["pixel_representation"],
            )
            write_ct_slice(
                out / f"{image_ids[i][k]}.dcm",
                stored,
                image_id=image_ids[i][k],
                study_uid=study_uids[i],
                series_uid=series_uids[i],
                patient_id=patient_ids[patient_of[i]],
                image_position=header["positions"][k],
                image_orientation=header["orientation"],
                pixel_spacing=(st.spacing, st.spacing),
                intercept=header["intercept"],
                bits_stored=header["bits_stored"],
                pixel_representation=header["pixel_representation"],
                instance_number=header["instance_numbers"][k],
                window_center=header["window_center"],
                window_width=header["window_width"],
            )
            all_labels.append((image_ids[i][k], labels[k]))

    labels_csv = out / "stage_2_train.csv"
    order = rng.permutation(len(all_labels))
    lines = ["ID,Label\n"]
    for j in order:
        image_id, row = all_labels[j]
        lines.extend(f"{image_id}_{name},{int(v)}\n" for name, v in zip(CLASSES, row, strict=True))
    labels_csv.write_text("".join(lines), encoding="ascii")

    table = np.stack([row for _, row in all_labels])
    prevalence = {name: float(table[:, c].mean()) for c, name in enumerate(CLASSES)}
    return ArchiveSummary(
        path=out,
        n_studies=studies,
        n_patients=len(set(patient_of)),
        n_slices=len(all_labels),
        prevalence=prevalence,
        labels_csv=labels_csv,
        elapsed_s=time.perf_counter() - t_start,
    )


def _without_lesions(st: _Study) -> _Study:
    return replace(st, lesions=())


def _series_header(rng: np.random.Generator, style: str, st: _Study) -> dict[str, Any]:
    """The DICOM header choices of one series (its quirks), drawn per series."""
    h: dict[str, Any] = {"pad": None}
    if style == "signed16":
        h.update(bits_stored=16, pixel_representation=1, intercept=-1024.0)
        if rng.random() < 0.5:  # values outside the reconstruction circle
            i = np.arange(st.rows)[:, None] - (st.rows - 1) / 2
            j = np.arange(st.cols)[None, :] - (st.cols - 1) / 2
            h["pad"] = i * i + j * j > (min(st.rows, st.cols) / 2) ** 2
    elif style == "unsigned12":
        h.update(bits_stored=12, pixel_representation=0, intercept=-1024.0)
    elif style == "rsna12":
        h.update(bits_stored=12, pixel_representation=0, intercept=1.0 if rng.random() < 0.1 else 0.0)
    else:
        h.update(bits_stored=16, pixel_representation=0, intercept=-1024.0)
    # Geometry: mostly axial, a few gantry-tilted (without a GantryDetectorTilt tag, as in RSNA).
    x0 = -(st.cols - 1) / 2 * st.spacing
    y0 = -(st.rows - 1) / 2 * st.spacing
    if rng.random() < 0.1:
        a = np.deg2rad(rng.uniform(8.0, 25.0))
        h["orientation"] = (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(-np.sin(a)))
    else:
        h["orientation"] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    h["positions"] = [(round(x0, 4), round(y0, 4), round(float(z), 4)) for z in st.z]
    numbering = rng.choice(["none", "up", "down"], p=[0.3, 0.55, 0.15])
    n = st.n_slices
    if numbering == "none":
        h["instance_numbers"] = [None] * n
    elif numbering == "up":
        h["instance_numbers"] = list(range(1, n + 1))
    else:
        h["instance_numbers"] = list(range(n, 0, -1))
    style_w = rng.choice(["single", "rsna", "pair"], p=[0.4, 0.4, 0.2])
    if style_w == "single":
        h["window_center"], h["window_width"] = 40.0, 80.0
    elif style_w == "rsna":  # RSNA's GE headers: two equal values with leading zeros
        h["window_center"], h["window_width"] = ["00036", "00036"], ["00080", "00080"]
    else:
        h["window_center"], h["window_width"] = [40.0, 600.0], [80.0, 2800.0]
    return h
