"""A study's findings as DICOM: one Comprehensive 3D SR (TID 1500 Measurement Report) per study.

What a PACS viewer shows beside the images, as IHE's AI Results profile asks: one measurement group
(TID 1501) per class, `any` and the five subtypes, each with the study-level probability (DCM 122157
"Probability", UCUM "1") and, as its source image, the slice that sets it; the algorithm's name and
version (the checkpoint file's sha256) in every group; the observer a device. The evidence
(Current Requested Procedure Evidence Sequence) lists every instance of the series judged. The SR is a
new series in the source study, `VerificationFlag` UNVERIFIED, content qualification RESEARCH, and its
series description says it is not for diagnostic use.

Finding codes (`FINDING_CODES`): SNOMED CT where we found a code: 1386000 "Intracranial hemorrhage"
(DICOM PS3.16's SNOMED subset, as pydicom's `codes.SCT.IntracranialHemorrhage`), 274100004 "Cerebral
hemorrhage", 21454007 "Subarachnoid intracranial hemorrhage" and 35486000 "Subdural intracranial
hemorrhage" (as HL7 FHIR stroke value sets use them); epidural and intraventricular hemorrhage
have codes of our own, in the private scheme `99ICH` that each SR declares.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

from ichdata.atomic import atomic_path
from ichdata.features import file_sha256

if TYPE_CHECKING:
    import pandas as pd
    from highdicom.sr import Comprehensive3DSR
    from pydicom import Dataset

    from ichdata.store import Store

__all__ = [
    "FINDING_CODES",
    "PRIVATE_SCHEME",
    "Finding",
    "StudySRs",
    "no_sr_reason",
    "study_sr",
    "write_study_srs",
]

#: The coding scheme of the classes SNOMED CT has no code for here, declared in each SR.
PRIVATE_SCHEME = "99ICH"
FINDING_CODES: Mapping[str, Code] = {
    "epidural": Code("EDH", PRIVATE_SCHEME, "Epidural hemorrhage"),
    "intraparenchymal": Code("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": Code("IVH", PRIVATE_SCHEME, "Intraventricular hemorrhage"),
    "subarachnoid": Code("21454007", "SCT", "Subarachnoid intracranial hemorrhage"),
    "subdural": Code("35486000", "SCT", "Subdural intracranial hemorrhage"),
    "any": Code("1386000", "SCT", "Intracranial hemorrhage"),
}
PROBABILITY = Code("122157", "DCM", "Probability")
NO_UNITS = Code("1", "UCUM", "no units")
SERIES_DESCRIPTION = "ich hemorrhage AI result - research use, not for diagnostic use"
SR_SERIES_NUMBER = 9901
_MANUFACTURER = "ich (open source)"
# Type 2 attributes highdicom copies from the first evidence instance; absent in some exports.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


@dataclass(frozen=True)
class Finding:
    """One class's study-level result: its probability and the SOP Instance UID of the slice that sets it."""

    probability: float
    key_slice: str


def no_sr_reason(evidence: Sequence[Dataset]) -> str | None:
    """Why these instances cannot be an SR's evidence, or None.

    An SR references each instance by its SOP Class and Instance UIDs: RSNA's files have no
    (0008,0016) SOP Class UID and `ID_…` identifiers that are not UIDs.
    """
    for ds in evidence:
        if "SOPClassUID" not in ds:
            return "the files have no (0008,0016) SOP Class UID"
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            value = str(ds.get(keyword, ""))
            if not UID(value).is_valid:
                return f"their {keyword} values are not DICOM UIDs (e.g. {value[:24]!r})"
    return None


def study_sr(
    evidence: Sequence[Dataset],
    findings: Mapping[str, Finding],
    *,
    algorithm_name: str,
    algorithm_version: str,
) -> Comprehensive3DSR:
    """The SR of one study: `evidence` are the headers of the judged instances (any order).

    `findings` maps each class to its `Finding`. The SR's Series and SOP Instance UIDs are new; the
    observer device's UID is derived from `algorithm_version`, so one model is one device.
    """
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from highdicom.sr import (
        AlgorithmIdentification,
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    first = evidence[0].copy()
    for keyword in _TYPE2:
        if keyword not in first:
            setattr(first, keyword, None)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    algorithm = AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["ich-device", algorithm_version]),
            name=algorithm_name,
            manufacturer_name=_MANUFACTURER,
            model_name=algorithm_name,
        ),
    )
    groups = []
    for name, finding in findings.items():
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=generate_uid(
                        entropy_srcs=["ich-finding", str(first.StudyInstanceUID), name, algorithm_version]
                    ),
                    identifier=name,
                ),
                finding_type=FINDING_CODES[name],
                algorithm_id=algorithm,
                source_images=[SourceImageForMeasurementGroup.from_source_image(by_uid[finding.key_slice])],
                measurements=[
                    Measurement(
                        name=PROBABILITY,
                        value=float(finding.probability),
                        unit=NO_UNITS,
                        algorithm_id=algorithm,
                    )
                ],
            )
        )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    return Comprehensive3DSR(
        evidence=[first, *[ds for ds in evidence if ds is not evidence[0]]],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="ich hemorrhage subtypes",
                responsible_organization="ich project",
            )
        ],
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version[:64],
    )


@dataclass(frozen=True)
class StudySRs:
    """What `write_study_srs` wrote: one file per study, and the studies without an SR and why."""

    written: dict[str, Path]
    not_written: dict[str, str]

    def __str__(self) -> str:
        out = f"wrote {len(self.written)} DICOM SR" + ("s" if len(self.written) != 1 else "")
        if self.not_written:
            reasons = sorted(set(self.not_written.values()))
            out += f"; no SR for {len(self.not_written)} studies: {'; '.join(reasons)}"
        return out


def write_study_srs(
    store: Store,
    source: str | os.PathLike[str],
    studies: pd.DataFrame,
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    algorithm_name: str,
) -> StudySRs:
    """One SR per row of `studies` (`ichmodel.predict.study_summary`), written as `OUT_DIR/<study uid>.dcm`.

    The evidence headers are read from the files under `source` that the store's rows came from (the
    manifest beside the store names them): the store itself keeps no patient data, the SR needs it.
    """
    from pydicom import dcmread

    from ichdata.paths import fs_path

    version = file_sha256(checkpoint)  # the algorithm's version
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = [c for c in store.classes if c in FINDING_CODES]
    study_of_series = store.series["study_uid"].to_numpy()
    written: dict[str, Path] = {}
    not_written: dict[str, str] = {}
    for row in studies.itertuples(index=False):
        study_uid = str(row.study_uid)
        rows = np.concatenate(
            [np.arange(*store.series_rows(int(s))) for s in np.flatnonzero(study_of_series == study_uid)]
        )
        evidence = [
            dcmread(Path(source) / fs_path(str(p)), stop_before_pixels=True) for p in store.source_path[rows]
        ]
        reason = no_sr_reason(evidence)
        if reason is not None:
            not_written[study_uid] = reason
            continue
        findings = {
            c: Finding(float(getattr(row, f"p_{c}")), str(getattr(row, f"{c}_slice"))) for c in classes
        }
        sr = study_sr(evidence, findings, algorithm_name=algorithm_name, algorithm_version=version)
        path = out / f"{study_uid}.dcm"
        with atomic_path(path) as tmp:
            sr.save_as(tmp, enforce_file_format=True)
        written[study_uid] = path
    return StudySRs(written, not_written)
