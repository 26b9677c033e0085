"""Fuzz check: the header walk (`ichdata.dicom.walk.walk_header`) against pydicom's reader, at scale.

    .venv/bin/python bench/fuzz_header_walk.py --seed 4 --cases 30000

The suite runs the same comparison on 300 Hypothesis cases per run
(`tests/ichdata/test_dicom.py::test_header_walk_agrees_with_pydicom_on_corrupt_files`); this runs as many
as asked. Each case takes a valid file (written here, with and without a sequence, or one of pydicom's
own test files), overwrites 1–4 bytes of its first 1,500, sometimes cuts it short, and reads it both
ways: the outcome (meta and pixel layout, or the SliceError's reason and message) must be the same.
Prints the differences found (at most 12) and their count; exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from ichdata import dicom
from ichdata.dicom import header
from ichdata.testing import add_reference_sequence, stored_from_hu, write_ct_slice


def _slice(path: Path, transfer_syntax: str | None = None, sequence: bool = False) -> bytes:
    hu = np.random.default_rng(0).integers(-1000, 3000, (24, 20)).astype(np.float64)
    kwargs = {} if transfer_syntax is None else {"transfer_syntax": transfer_syntax}
    write_ct_slice(
        path,
        stored_from_hu(hu),
        image_id=path.stem,
        study_uid="ID_study1",
        series_uid="ID_series1",
        patient_id="ID_patient1",
        image_position=(-125.0, -125.0, 42.5),
        **kwargs,
    )
    if sequence:  # a two-level sequence of defined length before the pixel data
        add_reference_sequence(path)
    return path.read_bytes()


def _outcome(path: Path, fast: bool) -> tuple[Any, ...]:
    header._FAST_HEADER = fast
    try:
        return ("ok", *dicom.read_header_layout(path))
    except dicom.SliceError as e:
        return (e.reason, e.detail)
    except Exception as e:  # anything else is a difference worth seeing
        return ("exception", type(e).__name__, str(e))
    finally:
        header._FAST_HEADER = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=20000)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # pydicom warns about some corrupt values, in both paths alike
    work = Path(tempfile.mkdtemp(prefix="ich-fuzz-"))
    sources = [
        _slice(work / "ID_a.dcm"),
        _slice(work / "ID_b.dcm", RLELossless),
        _slice(work / "ID_c.dcm", ImplicitVRLittleEndian),
        _slice(work / "ID_d.dcm", sequence=True),
        _slice(work / "ID_e.dcm", ImplicitVRLittleEndian, sequence=True),
    ]
    own = Path(pydicom.__file__).parent / "data" / "test_files"
    sources += [p.read_bytes() for p in sorted(own.glob("*.dcm")) if p.stat().st_size < 200_000][:30]
    rng = random.Random(args.seed)
    path = work / "ID_fuzz.dcm"
    differences = 0
    for i in range(args.cases):
        data = bytearray(rng.choice(sources))
        head = min(len(data), 1500)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(128, head) if head > 128 else 0
            data[at] = rng.choice([0, 1, 0xFF, 0xFE, rng.randrange(256), *b"SQUN"])
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        path.write_bytes(bytes(data))
        fast, slow = _outcome(path, True), _outcome(path, False)
        if fast != slow:
            differences += 1
            if differences <= 12:
                print(f"case {i}: walk {fast[:3]!r} | pydicom {slow[:3]!r}")
    print(f"{args.cases:,} cases from {len(sources)} files, seed {args.seed}: {differences} differences")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
