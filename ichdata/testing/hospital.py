"""Head-CT studies as a hospital's archive holds them, for the DICOMweb tests and `bench/pull.py`.

Unlike `write_archive` (RSNA's format: `ID_…` ids, no names), every file here carries what a PACS
has: valid DICOM UIDs (derived from the seed, so a seed gives the same studies), the CT Image Storage
SOP Class, a patient's name, ID and birth date, the study's date, time, ID and accession number, and
a frame of reference. The slices are `phantom_series` head phantoms, written with `write_ct_slice`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ichdata.testing.dicom_writer import stored_from_hu, write_ct_slice
from ichdata.testing.phantom import phantom_series

__all__ = ["HospitalStudy", "write_hospital_studies"]


@dataclass(frozen=True)
class HospitalStudy:
    """One study written by `write_hospital_studies`: its UIDs (slices in slice order) and its patient."""

    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    patient_name: str
    patient_id: str
    study_date: str
    files: tuple[Path, ...]


def write_hospital_studies(
    out: str | os.PathLike[str],
    *,
    studies: int = 3,
    slices: int = 6,
    image_size: int = 64,
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    first_date: int = 20240101,
) -> list[HospitalStudy]:
    """Write `studies` single-series CT studies under `out/<n>/` (one patient each); returns them.

    Study k is dated `first_date + k` (days within one month: keep `first_date + studies` a date),
    so date filters have something to select. `transfer_syntax` may be any `write_ct_slice` writes.
    """
    root = Path(out)
    written = []
    for k in range(studies):
        uid = lambda *parts, k=k: generate_uid(entropy_srcs=["ich-hospital", str(seed), str(k), *parts])  # noqa: E731
        study_uid, series_uid = uid("study"), uid("series")
        phantom = phantom_series(seed * 1000 + k, n_slices=slices, image_size=image_size, lesions=())
        name, patient_id, date = f"DOE^JANE{k}", f"MRN{seed:03d}{k:04d}", str(first_date + k)
        folder = root / f"{k:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        sops, files = [], []
        for t in range(slices):
            sop = uid("instance", str(t))
            path = folder / f"{t:03d}.dcm"
            write_ct_slice(
                path,
                stored_from_hu(phantom.hu[t]),
                image_id=sop,
                study_uid=study_uid,
                series_uid=series_uid,
                patient_id=patient_id,
                image_position=(0.0, 0.0, float(phantom.slice_z[t])),
                pixel_spacing=(phantom.pixel_spacing, phantom.pixel_spacing),
                instance_number=t + 1,
                transfer_syntax=transfer_syntax,
                extra={
                    "PatientName": name,
                    "PatientBirthDate": "19700101",
                    "PatientSex": "F",
                    "StudyDate": date,
                    "StudyTime": "101500",
                    "StudyID": f"S{k}",
                    "AccessionNumber": f"ACC{seed:03d}{k:04d}",
                    "ReferringPhysicianName": "",
                    "SeriesNumber": "1",
                    "FrameOfReferenceUID": uid("frame"),
                    "Manufacturer": "ich synthetic",
                    "SeriesDescription": "HEAD W/O",
                },
            )
            sops.append(sop)
            files.append(path)
        written.append(
            HospitalStudy(study_uid, series_uid, tuple(sops), name, patient_id, date, tuple(files))
        )
    return written
