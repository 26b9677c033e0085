"""`ich predict --sr` and `--send`: one valid DICOM SR per study, read back to the CSV's numbers.

The SRs are checked by dicom3tools' `dciodvfy` (no errors) and read back with `highdicom.sr.srread`:
one measurement group per class with the study's probability and the slice that sets it, the evidence
listing every instance judged, a new series in the source study, UNVERIFIED. RSNA-like inputs get
their CSVs and one line saying why no SR. With a real Orthanc (tests/orthanc.py): a DICOMweb URL as
SOURCE, and the SRs stored back and found by QIDO-RS in their studies.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest

from flows.cli import main
from ichdata.features import file_sha256
from ichdata.testing import HospitalStudy, stored_from_hu, write_ct_slice, write_hospital_studies
from ichmodel.sr import FINDING_CODES, PRIVATE_SCHEME, SERIES_DESCRIPTION

CLASSES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


def dciodvfy_errors(path: Path) -> list[str]:
    """The `Error` lines dciodvfy reports for `path` (skips the test where dciodvfy is missing)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (dicom3tools; .ci/install-orthanc installs it)")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def check_sr(path: Path, study: HospitalStudy, summary_row: pd.Series, checkpoint: Path) -> None:
    """What a viewer and a reader of the SR rely on, against the study and its row of the studies CSV."""
    from highdicom.sr import ValueTypeValues, srread
    from highdicom.sr.utils import find_content_items

    assert dciodvfy_errors(path) == []
    sr = srread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == study.study_uid
    assert sr.SeriesInstanceUID != study.series_uid
    assert sr.SOPInstanceUID not in study.sop_uids
    assert sr.PatientName == study.patient_name
    assert sr.PatientID == study.patient_id
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesDescription == SERIES_DESCRIPTION
    assert "not for diagnostic use" in sr.SeriesDescription
    assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == [PRIVATE_SCHEME]
    # the evidence: every instance of the judged series, by SOP Class and Instance UID
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == study.series_uid
    refs = {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence}
    assert refs == {("1.2.840.10008.5.1.4.1.1.2", uid) for uid in study.sop_uids}
    # one group per class: the probability, the key slice, the algorithm and its version
    report: Any = sr.content  # the MeasurementReport (TID 1500) srread rebuilt
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == list(CLASSES)
    sha = file_sha256(checkpoint)
    for group, name in zip(groups, CLASSES, strict=True):
        assert group.finding_type == FINDING_CODES[name]
        (measurement,) = group.get_measurements()
        assert measurement.name.value == "122157"
        assert measurement.value == pytest.approx(summary_row[f"p_{name}"], rel=1e-5, abs=1e-7)
        (source,) = find_content_items(group[0], value_type=ValueTypeValues.IMAGE)
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == summary_row[f"{name}_slice"]
        texts = {
            i.ConceptNameCodeSequence[0].CodeValue: i.TextValue
            for i in find_content_items(group[0], value_type=ValueTypeValues.TEXT, recursive=True)
        }
        assert (texts["111001"], texts["111003"]) == ("ich xception_gru", sha)  # algorithm name, version
    (observer,) = report.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # a device


@pytest.mark.slow
def test_predict_writes_one_valid_sr_per_study(tiny_checkpoint: Path, tmp_path: Path) -> None:
    studies = write_hospital_studies(tmp_path / "src", studies=2, slices=4, seed=3)
    out, sr_dir = tmp_path / "pred.csv", tmp_path / "sr"
    argv = ["predict", str(tiny_checkpoint), str(tmp_path / "src"), "--out", str(out), "--sr", str(sr_dir)]
    assert main([*argv, "--workers", "1", "--quiet", "--device", "cpu"]) == 0
    summary = pd.read_csv(out.with_name("pred.studies.csv")).set_index("study_uid")
    assert sorted(p.name for p in sr_dir.iterdir()) == sorted(f"{s.study_uid}.dcm" for s in studies)
    for study in studies:
        check_sr(sr_dir / f"{study.study_uid}.dcm", study, summary.loc[study.study_uid], tiny_checkpoint)


def test_rsna_like_inputs_get_csvs_and_one_line_why_no_sr(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "rsna"
    src.mkdir()
    yy, xx = np.mgrid[:64, :64]
    hu = np.where(((yy - 32) ** 2 + (xx - 32) ** 2) < 26**2, 35.0, -1000.0)
    for k in range(3):
        write_ct_slice(
            src / f"ID_{k:09x}.dcm",
            stored_from_hu(hu),
            image_id=f"ID_{k:09x}",
            study_uid="ID_study1",
            series_uid="ID_series1",
            patient_id="ID_patient1",
            image_position=(0.0, 0.0, 5.0 * k),
            extra={"SOPClassUID": None},
        )
    out, sr_dir = tmp_path / "pred.csv", tmp_path / "sr"
    argv = ["predict", str(tiny_checkpoint), str(src), "--out", str(out), "--sr", str(sr_dir)]
    assert main([*argv, "--workers", "1", "--quiet", "--device", "cpu"]) == 0
    assert len(pd.read_csv(out)) == 3 * 6
    assert list(sr_dir.iterdir()) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ich predict: wrote 0 DICOM SRs; no SR for 1 studies: the files have no (0008,0016) SOP Class UID; "
        f"their predictions are in {out}"
    ]


def test_send_needs_a_url_source(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", str(tiny_checkpoint), str(tmp_path), "--out", str(tmp_path / "p.csv"), "--send"]
    assert main(argv) == 2
    assert "need SOURCE to be a DICOMweb URL" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_from_a_url_sends_the_srs_back(orthanc: Any, tiny_checkpoint: Path, tmp_path: Path) -> None:
    orthanc.clear()
    studies = write_hospital_studies(tmp_path / "src", studies=2, slices=4, seed=4)
    orthanc.upload([f for s in studies for f in s.files])
    out, land = tmp_path / "pred.csv", tmp_path / "landing"
    done = orthanc.ich(
        "predict", str(tiny_checkpoint), orthanc.url, "--out", str(out), "--landing", str(land), "--send",
        "--workers", "1", "--quiet", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"sent 2 SRs to {orthanc.url} (STOW-RS)" in done.stdout
    summary = pd.read_csv(out.with_name("pred.studies.csv")).set_index("study_uid")
    fetched = tmp_path / "fetched"
    for study in studies:
        # QIDO-RS finds the SR in the source study; WADO-RS gives it back as it was stored
        found = orthanc.python(_FIND_SR, orthanc.url, study.study_uid, str(fetched))
        assert len(found) == 1, found
        check_sr(Path(found[0]), study, summary.loc[study.study_uid], tiny_checkpoint)
    # a second pull of the study (CT only, by default) does not fetch the SR back into the landing folder
    again = orthanc.ich("pull", orthanc.url, str(land), "--quiet")
    assert "0 instances" in again.stdout, again.stdout
    assert not list(land.rglob("*SR*"))
    assert all(pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT" for p in land.rglob("*.dcm"))


_FIND_SR = """
import json, sys
from pathlib import Path
from ichdata.dicomweb import Archive
url, study, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
archive = Archive(url)
paths = []
for series in archive.find_series(study, "SR"):
    for sop in archive.find_instances(study, series):
        out.mkdir(parents=True, exist_ok=True)
        (path := out / (sop + ".dcm")).write_bytes(b"".join(archive.retrieve(study, series, sop)))
        paths.append(str(path))
print(json.dumps(paths))
"""
