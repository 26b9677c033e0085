"""Inputs and a reference of the conversion tests' own (used by test_scan/plan/convert/verify/store).

The reference renders a slice from the stored values with DESIGN.md's formulas written out here in
float64 (12-bit correction, slope/intercept, the three windows, centred air padding) and OpenCV's area
resize: an implementation independent of `ichdata.windows`, which the store must match within ±1.
"""

from __future__ import annotations

import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom.uid import RLELossless

from ichdata.testing import stored_from_hu, write_ct_slice

WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))


def reference_hu(
    stored: np.ndarray, slope: float, intercept: float, bits_stored: int, signed: int
) -> np.ndarray:
    s = stored.astype(np.float64)
    if bits_stored == 12 and signed == 0 and intercept > -100:
        s = s + 1000
        s[s >= 4096] -= 4096
        intercept = -1000.0
    return s * slope + intercept


def reference_render(hu: np.ndarray, size: int = 256) -> np.ndarray:
    rows, cols = hu.shape
    n = max(rows, cols)
    out = np.empty((3, size, size), dtype=np.uint8)
    for c, (level, width) in enumerate(WINDOWS):
        w = np.clip((hu - (level - width / 2)) / width, 0, 1) * 255
        sq = np.zeros((n, n), dtype=np.float64)  # air renders 0 in every window
        top, left = (n - rows) // 2, (n - cols) // 2
        sq[top : top + rows, left : left + cols] = w
        r = cv2.resize(sq.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) if n != size else sq
        out[c] = np.clip(np.rint(r), 0, 255).astype(np.uint8)
    return out


@dataclass
class Written:
    path: str  # relative to the source root
    image_id: str
    study_uid: str
    series_uid: str
    position: float  # along the normal: the order the store must have
    expected: np.ndarray  # reference render


def _phantom(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """HU: air around a skull ring, brain and noise (so every window has something to show)."""
    y, x = np.mgrid[0:rows, 0:cols]
    r = np.hypot((y - rows / 2) / (rows / 2), (x - cols / 2) / (cols / 2))
    hu = np.full((rows, cols), -1000.0)
    hu[r < 0.9] = 1200.0
    hu[r < 0.8] = 35.0
    hu += rng.normal(0, 20, hu.shape) * (r < 0.9)
    return hu


#: The geometry and header cases the store must get right: name -> (rows, cols, header kwargs, orientation).
CASES: dict[str, dict] = {
    "axial": {},
    "tilted": {"orientation": (1, 0, 0, 0, np.cos(0.3), np.sin(0.3))},
    "coronal": {"orientation": (1, 0, 0, 0, 0, -1)},
    "reversed_instance": {"reverse_instance": True},
    "rsna_12bit": {"bits_stored": 12, "pixel_representation": 0, "intercept": 0.0},
    "slope": {"slope": 2.5, "intercept": -1000.0},
    "big768": {"rows": 768, "cols": 768},
    "nonsquare": {"rows": 490, "cols": 638},
}


def write_case(
    root: Path, case: str, rng: np.random.Generator, n: int = 3, prefix: str = ""
) -> list[Written]:
    """One series of `n` slices for `case`, files named so that name order is not slice order."""
    spec = CASES[case]
    rows, cols = spec.get("rows", 256), spec.get("cols", 256)
    orient = spec.get("orientation", (1, 0, 0, 0, 1, 0))
    normal = np.cross(orient[:3], orient[3:])
    slope, intercept = spec.get("slope", 1.0), spec.get("intercept", -1024.0)
    bits, signed = spec.get("bits_stored", 16), spec.get("pixel_representation", 1)
    study, series = f"1.2.826.0.1.{prefix}{case}.1", f"1.2.826.0.1.{prefix}{case}.1.1"
    out = []
    steps = rng.permutation(n)  # files written in shuffled position order
    for k, step in enumerate(steps):
        hu = _phantom(rng, rows, cols)
        stored = stored_from_hu(
            hu, slope=slope, intercept=intercept, bits_stored=bits, pixel_representation=signed
        )
        position = 5.0 * float(step)
        ipp = tuple(float(v) for v in (np.array([-60.0, -60.0, 10.0]) + position * normal))
        inst = (n - step) if spec.get("reverse_instance") else int(step) + 1
        iid = f"ID_{prefix}{case}{k:02d}"
        rel = f"{prefix}{case}/f{k:02d}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_ct_slice(
            root / rel,
            stored,
            image_id=iid,
            study_uid=study,
            series_uid=series,
            patient_id=f"ID_{zlib.crc32(case.encode()):08x}" if case != "axial" else "MRN-0042",
            image_position=ipp,
            image_orientation=tuple(float(v) for v in orient),
            slope=slope,
            intercept=intercept,
            bits_stored=bits,
            pixel_representation=signed,
            instance_number=inst,
        )
        exp = reference_render(reference_hu(stored, slope, intercept, bits, signed))
        out.append(Written(rel, iid, study, series, position, exp))
    return out


def write_same_position(root: Path, first: Written) -> str:
    """A second slice of `first`'s (axial) series at `first`'s position, another image id; its path."""
    rel = f"{Path(first.path).parent}/zz_same_position"
    write_ct_slice(
        root / rel,
        stored_from_hu(np.zeros((64, 64))),
        image_id="ID_same_position",
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        patient_id="MRN-0042",
        image_position=(-60.0, -60.0, 10.0 + first.position),
        instance_number=99,
    )
    return rel


def _good(root: Path, rel: str, iid: str, rng: np.random.Generator, **kw: Any) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    stored = stored_from_hu(_phantom(rng, 64, 64))
    args: dict[str, Any] = dict(
        image_id=iid,
        study_uid="1.2.826.0.9",
        series_uid="1.2.826.0.9.1",
        patient_id="ID_bad",
        image_position=(0, 0, 0),
    )
    args.update(kw)
    write_ct_slice(root / rel, stored, **args)


def write_broken(root: Path, rng: np.random.Generator, keep: Written) -> dict[str, str]:
    """One file per set-aside reason (reason -> path relative to `root`); `keep` is duplicated."""
    d = root / "broken"
    d.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    (d / "notes.txt").write_text("not a DICOM file\n")
    paths["not_dicom"] = "broken/notes.txt"
    (d / "empty").write_bytes(b"")
    paths["empty"] = "broken/empty"
    _good(root, "broken/truncated", "ID_trunc", rng)
    data = (d / "truncated").read_bytes()
    (d / "truncated").write_bytes(data[: len(data) - 3000])
    paths["truncated"] = "broken/truncated"
    cases: dict[str, dict[str, Any]] = {
        "no_pixel_data": {"extra": {"PixelData": None}},
        "size_mismatch": {"extra": {"Rows": 96}},
        "not_ct": {"modality": "MR"},
        "colour": {"extra": {"SamplesPerPixel": 3}},
        "localizer": {"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")},
        "multi_frame": {"extra": {"NumberOfFrames": 2}},
        "missing_geometry": {"extra": {"ImagePositionPatient": None}},
        "missing_uid": {"extra": {"SeriesInstanceUID": None}},
    }
    for reason, kw in cases.items():
        _good(root, f"broken/{reason}", f"ID_{reason}", rng, **kw)
        paths[reason] = f"broken/{reason}"
    # Pixel data that only fails when decoded: a corrupt RLE header (found by the conversion, not the scan).
    _good(
        root,
        "broken/undecodable.dcm",
        "ID_undecodable",
        rng,
        transfer_syntax=RLELossless,
        image_position=(0, 0, 1),
    )
    b = bytearray((d / "undecodable.dcm").read_bytes())
    i = b.rfind(b"\xfe\xff\x00\xe0")  # the last item tag: the one fragment
    b[i + 8 : i + 8 + 64] = b"\x07" + b"\x00" * 63
    (d / "undecodable.dcm").write_bytes(bytes(b))
    paths["undecodable"] = "broken/undecodable.dcm"
    # A transfer syntax nobody knows: the RLE UID patched in place (same length).
    _good(root, "broken/unsupported", "ID_unsupported", rng, transfer_syntax=RLELossless)
    b = bytearray((d / "unsupported").read_bytes())
    j = b.find(b"1.2.840.10008.1.2.5\x00")
    b[j : j + 20] = b"1.2.840.10008.9.9.9\x00"
    (d / "unsupported").write_bytes(bytes(b))
    paths["unsupported_transfer_syntax"] = "broken/unsupported"
    # A DICOMDIR media directory (DICOM, but not an image).
    paths["not_image"] = write_dicomdir(root / "export")
    shutil.copy(root / keep.path, d / "copy_of_kept.dcm")
    paths["duplicate"] = "broken/copy_of_kept.dcm"
    return {k: v.replace(os.sep, "/") for k, v in paths.items()}


def write_dicomdir(folder: Path) -> str:
    """A hospital-style export: a DICOMDIR and the extensionless files it indexes.

    Returns the DICOMDIR's path relative to the folder's parent. The two slices carry a PatientName (PHI that
    must not be stored).
    """
    from pydicom.fileset import FileSet
    from pydicom.uid import generate_uid

    staging = folder.parent / "_staging"
    staging.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    fs = FileSet()
    for z in range(2):
        p = staging / f"x{z}.dcm"
        write_ct_slice(
            p,
            stored_from_hu(_phantom(np.random.default_rng(z), 64, 64)),
            image_id=generate_uid(),
            study_uid=study,
            series_uid=series,
            patient_id="MRN-7781",
            image_position=(0.0, 0.0, float(z)),
            instance_number=z + 1,
            extra={
                "StudyDate": "20200101",
                "StudyTime": "120000",
                "StudyID": "1",
                "SeriesNumber": 1,
                "PatientName": "Doe^Jane",
            },
        )
        fs.add(p)
    fs.write(folder)
    fs._stage["t"].cleanup()  # pydicom's staging folder warns when left to the garbage collector
    shutil.rmtree(staging)
    return f"{folder.name}/DICOMDIR"
