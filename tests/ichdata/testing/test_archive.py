"""The RSNA-format synthetic archive: `write_archive` and `ich synth`."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from flows.cli import main
from ichdata.dicom import read_slice
from ichdata.errors import UserError
from ichdata.labels import CLASSES
from ichdata.testing import SUBTYPES, SynthConfig, write_archive


def _labels_by_image(csv_path: Path) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["ID", "Label"]
        for key, value in reader:
            image_id, subtype = key.rsplit("_", 1)
            out[image_id].append((subtype, int(value)))
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "archive"
    write_archive(out, studies=24, seed=11, image_size=64)
    return out


def test_archive_has_one_file_per_image_and_six_label_rows_each(
    read_dicom: Callable[..., pydicom.Dataset], archive: Path
) -> None:
    files = sorted(archive.glob("*.dcm"))
    assert sorted(p.name for p in archive.iterdir()) == sorted(
        [*(p.name for p in files), "stage_2_train.csv"]
    )
    labels = _labels_by_image(archive / "stage_2_train.csv")
    assert sorted(labels) == sorted(p.stem for p in files)
    for rows in labels.values():
        assert [name for name, _ in rows] == list(CLASSES)
        assert rows[5][1] == max(v for _, v in rows[:5])
    for p in files:
        assert p.stem.startswith("ID_")
        assert len(p.stem) == 12
        int(p.stem[3:], 16)
    headers = [read_dicom(p, stop_before_pixels=True) for p in files]
    studies = {ds.StudyInstanceUID for ds in headers}
    assert len(studies) == 24
    assert len({ds.SeriesInstanceUID for ds in headers}) == 24
    per_study: dict[str, int] = defaultdict(int)
    for ds in headers:
        per_study[ds.StudyInstanceUID] += 1
    assert all(20 <= n <= 40 for n in per_study.values())


def test_archive_reproduces_rsna_header_quirks(
    read_dicom: Callable[..., pydicom.Dataset], archive: Path
) -> None:
    headers = [read_dicom(p, stop_before_pixels=True) for p in sorted(archive.glob("*.dcm"))]
    series = {ds.SeriesInstanceUID: ds for ds in headers}
    styles = {(ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) for ds in series.values()}
    assert any(
        bits == 12 and rep == 0 and intercept > -100 for bits, rep, intercept in styles
    )  # RSNA's broken header
    assert (16, 1, -1024.0) in styles
    assert (12, 0, -1024.0) in styles
    assert any(ds.WindowCenter.__class__.__name__ == "MultiValue" for ds in series.values())
    assert any("InstanceNumber" not in ds for ds in series.values())
    assert any("InstanceNumber" in ds for ds in series.values())
    assert any(abs(float(ds.ImageOrientationPatient[5])) > 0.1 for ds in series.values())  # gantry tilt
    for ds in headers:
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID):
            assert uid.startswith("ID_")
    studies_of = defaultdict(set)
    for ds in headers:
        studies_of[ds.PatientID].add(ds.StudyInstanceUID)
    assert max(len(s) for s in studies_of.values()) >= 2
    assert max(len(s) for s in studies_of.values()) <= 3


def test_archive_slices_read_back_as_head_ct_and_labels_run_along_slice_order(archive: Path) -> None:
    labels = {k: [v for _, v in rows] for k, rows in _labels_by_image(archive / "stage_2_train.csv").items()}
    series: dict[str, list[tuple[float, str, float, float]]] = defaultdict(list)
    for path in archive.glob("*.dcm"):
        hu, meta = read_slice(path)
        centre = hu[24:40, 24:40]
        series[meta.series_uid].append(
            (meta.slice_position, meta.image_id, float(np.median(centre)), float(hu.max()))
        )
    positives = 0
    for items in series.values():
        items.sort()
        names = [image_id for _, image_id, _, _ in items]
        assert names != sorted(names)  # file names say nothing about slice order
        # Every header style decodes to head CT: brain in the middle, bone somewhere, on mid slices.
        mid = items[len(items) // 2]
        assert 10 < mid[2] < 60
        assert mid[3] > 700
        table = np.array([labels[image_id] for image_id in names])
        for c in range(6):
            ks = np.flatnonzero(table[:, c])
            if ks.size:
                assert np.array_equal(ks, np.arange(ks[0], ks[-1] + 1))  # one run of adjacent slices
        positives += int(table[:, 5].any())
    assert 0 < positives < len(series)


def test_archive_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    a = write_archive(tmp_path / "a", studies=2, seed=5, image_size=64)
    b = write_archive(tmp_path / "b", studies=2, seed=5, image_size=64)
    write_archive(tmp_path / "c", studies=2, seed=6, image_size=64)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert files_a != sorted(p.name for p in (tmp_path / "c").iterdir())
    assert a.n_slices == b.n_slices
    assert str(a).startswith(f"wrote {a.n_slices:,} slices (2 studies, ")


@pytest.mark.parametrize("prevalence", [0.14, 0.35])
def test_archive_prevalence_is_close_to_the_requested(tmp_path: Path, prevalence: float) -> None:
    summary = write_archive(tmp_path / "a", studies=30, seed=3, any_prevalence=prevalence, image_size=32)
    table = np.array([[v for _, v in rows] for rows in _labels_by_image(summary.labels_csv).values()])
    assert len(table) == summary.n_slices
    assert abs(table[:, 5].mean() - prevalence) < 0.015
    assert summary.prevalence["any"] == pytest.approx(table[:, 5].mean())
    for c, name in enumerate(SUBTYPES):
        assert summary.prevalence[name] == pytest.approx(table[:, c].mean())
    assert summary.prevalence["subdural"] > summary.prevalence["epidural"]


def test_archive_without_hemorrhage(tmp_path: Path) -> None:
    summary = write_archive(tmp_path / "a", studies=2, seed=0, any_prevalence=0.0, image_size=32)
    assert set(summary.prevalence.values()) == {0.0}


def test_archive_refuses_a_non_empty_folder_and_bad_options(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(UserError, match="already exists and is not an empty folder"):
        write_archive(tmp_path, studies=1, seed=0)
    with pytest.raises(UserError, match=r"--prevalence must be between 0 and 0\.6, got 0\.9"):
        write_archive(tmp_path / "n", studies=1, seed=0, any_prevalence=0.9)
    with pytest.raises(UserError, match="--studies must be at least 1, got 0"):
        write_archive(tmp_path / "n", studies=0, seed=0)
    assert not (tmp_path / "n").exists()


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "arch"
    assert (
        main(
            ["synth", str(out), "--studies", "1", "--seed", "4", "--image-size", "32", "--prevalence", "0.2"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith("wrote ")
    assert str(out) in printed
    n = len(list(out.glob("*.dcm")))
    assert 20 <= n <= 40
    assert main(["synth", str(out), "--studies", "1", "--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert err == f"ich: error: {out} already exists and is not an empty folder; choose a new one\n"


def test_archive_is_byte_identical_for_any_number_of_workers(tmp_path: Path) -> None:
    one = write_archive(tmp_path / "one", studies=5, seed=8, image_size=32, workers=1)
    two = write_archive(tmp_path / "two", studies=5, seed=8, image_size=32, workers=2)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(names) == one.n_slices + 1  # every slice and the label CSV
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (one.n_slices, one.n_patients, one.prevalence) == (two.n_slices, two.n_patients, two.prevalence)


def test_archive_refuses_fewer_than_one_worker(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--workers must be at least 1, got 0"):
        write_archive(tmp_path / "n", studies=1, seed=0, workers=0)
    assert not (tmp_path / "n").exists()


def test_synth_config_gives_write_archive_its_arguments(tmp_path: Path) -> None:
    config = SynthConfig(out=tmp_path / "a", prevalence=0.2, workers=3)
    assert config.archive_kwargs() == {
        "out": tmp_path / "a",
        "studies": 20,
        "seed": 0,
        "any_prevalence": 0.2,
        "image_size": 512,
        "workers": 3,
    }
