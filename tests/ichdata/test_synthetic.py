"""The DICOM writer, the head-CT phantom and the RSNA-format synthetic archive."""

from __future__ import annotations

import csv
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.pixels.encoders import JPEG2000LosslessEncoder, JPEGLSLosslessEncoder
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from ichdata.cli import main
from ichdata.dicom import read_slice
from ichdata.errors import UserError
from ichdata.labels import CLASSES
from ichdata.synthetic import (
    SUBTYPES,
    phantom_series,
    stored_from_hu,
    write_archive,
    write_ct_slice,
)

IDS: dict[str, Any] = {
    "image_id": "ID_0a1b2c3d4",
    "study_uid": "ID_5e6f7a8b9c",
    "series_uid": "ID_d0e1f2a3b4",
    "patient_id": "ID_c5d6e7f8",
}


def _read(path: Path, **kwargs: Any) -> pydicom.Dataset:
    # RSNA's `ID_` UIDs are invalid UIDs: pydicom warns when it converts them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = pydicom.dcmread(path, **kwargs)
        for elem in ds.iterall():
            _ = elem.value
        for elem in ds.file_meta:
            _ = elem.value
        return ds


def _rsna_correct(stored: np.ndarray, intercept: float) -> np.ndarray:
    """DESIGN.md step 1, written out plainly for the tests."""
    x = stored.astype(np.int64) + 1000
    x[x >= 4096] -= 4096
    return (x - 1000).astype(np.float64)


# ---------------------------------------------------------------------------------------------- writer


@pytest.mark.parametrize(
    ("bits_stored", "pixel_representation", "slope", "intercept"),
    [
        (16, 1, 1.0, -1024.0),
        (12, 0, 1.0, -1024.0),
        (12, 0, 1.0, 0.0),
        (16, 0, 0.5, -1024.0),
        (12, 1, 2.0, -3.5),
    ],
)
def test_write_ct_slice_round_trips_stored_values_and_header(
    tmp_path: Path, bits_stored: int, pixel_representation: int, slope: float, intercept: float
) -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 2000, size=(24, 40))
    stored = stored_from_hu(
        hu,
        slope=slope,
        intercept=intercept,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
    )
    path = tmp_path / "ID_0a1b2c3d4.dcm"
    orientation = (1.0, 0.0, 0.0, 0.0, 0.9659258262890683, -0.25881904510252074)
    write_ct_slice(
        path,
        stored,
        **IDS,
        image_position=(-125.0, -110.25, 37.5),
        image_orientation=orientation,
        pixel_spacing=(0.5, 0.25),
        slope=slope,
        intercept=intercept,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
        window_center=["00036", "00036"],
        window_width=[80, 80],
    )
    raw = path.read_bytes()
    assert raw[:128] == bytes(128)
    assert raw[128:132] == b"DICM"
    ds = _read(path)
    assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == "ID_0a1b2c3d4"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == "ID_0a1b2c3d4"
    assert ds.StudyInstanceUID == "ID_5e6f7a8b9c"
    assert ds.SeriesInstanceUID == "ID_d0e1f2a3b4"
    assert ds.PatientID == "ID_c5d6e7f8"
    assert ds.Modality == "CT"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (ds.Rows, ds.Columns) == (24, 40)
    assert [float(x) for x in ds.PixelSpacing] == [0.5, 0.25]
    assert [float(x) for x in ds.ImagePositionPatient] == [-125.0, -110.25, 37.5]
    assert np.allclose([float(x) for x in ds.ImageOrientationPatient], orientation, atol=1e-12)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, bits_stored, bits_stored - 1)
    assert ds.PixelRepresentation == pixel_representation
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (slope, intercept)
    assert [float(x) for x in ds.WindowCenter] == [36.0, 36.0]
    assert [float(x) for x in ds.WindowWidth] == [80.0, 80.0]
    assert "InstanceNumber" not in ds
    assert np.array_equal(ds.pixel_array, stored)


def test_stored_from_hu_under_the_broken_rsna_header_is_undone_by_the_design_correction() -> None:
    hu = np.array([[-1000, -999, -1, 0, 1, 40, 1500, 3095]], dtype=np.float32)
    stored = stored_from_hu(hu, intercept=0.0, bits_stored=12, pixel_representation=0)
    assert stored.dtype == np.uint16
    assert stored.max() < 4096
    # Negative HU wrap around 4096, as in RSNA's files: -1000 HU was stored as 3096.
    assert stored.tolist() == [[3096, 3097, 4095, 0, 1, 40, 1500, 3095]]
    assert np.array_equal(_rsna_correct(stored, 0.0), hu)
    # The ordinary headers: round((hu - intercept) / slope), clipped to the bits.
    assert stored_from_hu(np.array([-1024.0, 0.4, 40.6]), intercept=-1024.0).tolist() == [0, 1024, 1065]
    assert stored_from_hu(np.array([-1024.0, 0.0, 40.0]), slope=0.5, intercept=-1024.0).tolist() == [
        0,
        2048,
        2128,
    ]
    assert stored_from_hu(np.array([-5000.0, 9000.0]), bits_stored=12, pixel_representation=0).tolist() == [
        0,
        4095,
    ]


def test_write_ct_slice_writes_what_read_slice_turns_back_into_hu(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    hu = np.rint(rng.uniform(-1000, 3000, size=(16, 20)))
    cases: dict[str, dict[str, Any]] = {
        "rsna12": {"intercept": 0.0, "bits_stored": 12, "pixel_representation": 0},
        "rsna12_one": {"intercept": 1.0, "bits_stored": 12, "pixel_representation": 0},
        "signed": {"intercept": -1024.0},
        "slope": {"slope": 0.5, "intercept": -1024.0, "bits_stored": 16, "pixel_representation": 0},
    }
    for name, kwargs in cases.items():
        path = tmp_path / f"{name}.dcm"
        write_ct_slice(path, stored_from_hu(hu, **kwargs), **IDS, image_position=(0, 0, 0), **kwargs)
        got, meta = read_slice(path)
        assert np.array_equal(got, hu.astype(np.float32)), name
        assert meta.image_id == IDS["image_id"]
        assert meta.instance_number is None


def _encodable(encoder: object) -> bool:
    return bool(encoder.is_available)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        RLELossless,
        pytest.param(
            JPEG2000Lossless,
            marks=pytest.mark.skipif(
                not _encodable(JPEG2000LosslessEncoder), reason="no JPEG 2000 encoder installed"
            ),
        ),
        pytest.param(
            JPEGLSLossless,
            marks=pytest.mark.skipif(
                not _encodable(JPEGLSLosslessEncoder), reason="no JPEG-LS encoder (pyjpegls)"
            ),
        ),
    ],
)
@pytest.mark.parametrize("signed", [True, False])
def test_write_ct_slice_other_transfer_syntaxes_are_lossless(
    tmp_path: Path, transfer_syntax: str, signed: bool
) -> None:
    rng = np.random.default_rng(2)
    hu = rng.uniform(-1024, 1500, size=(32, 48))
    kwargs: dict[str, Any] = (
        {"pixel_representation": 1} if signed else {"pixel_representation": 0, "bits_stored": 12}
    )
    stored = stored_from_hu(hu, **kwargs)
    path = tmp_path / "x.dcm"
    write_ct_slice(
        path,
        stored,
        **IDS,
        image_position=(0, 0, 5),
        transfer_syntax=transfer_syntax,
        instance_number=7,
        **kwargs,
    )
    ds = _read(path)
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    assert ds.SOPInstanceUID == IDS["image_id"]  # compression must not mint a new UID
    assert ds.InstanceNumber == 7
    assert np.array_equal(ds.pixel_array, stored)


def test_write_ct_slice_rejects_values_the_header_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"stored values 0\.\.4096 do not fit 12 bits unsigned \(0\.\.4095\)"
    ):
        write_ct_slice(
            tmp_path / "x.dcm",
            np.array([[0, 4096]]),
            **IDS,
            image_position=(0, 0, 0),
            bits_stored=12,
            pixel_representation=0,
        )
    with pytest.raises(ValueError, match="must hold integers"):
        write_ct_slice(tmp_path / "x.dcm", np.zeros((2, 2)), **IDS, image_position=(0, 0, 0))
    with pytest.raises(ValueError, match="must be 2-D"):
        write_ct_slice(tmp_path / "x.dcm", np.zeros((2, 2, 2), np.int16), **IDS, image_position=(0, 0, 0))
    assert not (tmp_path / "x.dcm").exists()


def test_write_ct_slice_extra_overrides_and_removes_elements(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    extra = {"ImagePositionPatient": None, "Rows": 600, "Modality": "MR", "GantryDetectorTilt": "12.5"}
    write_ct_slice(path, np.zeros((4, 6), np.int16), **IDS, image_position=(0, 0, 0), extra=extra)
    ds = _read(path, stop_before_pixels=True)
    assert "ImagePositionPatient" not in ds
    assert ds.Rows == 600
    assert ds.Modality == "MR"
    assert float(ds.GantryDetectorTilt) == 12.5
    assert "ImageOrientationPatient" in ds


# --------------------------------------------------------------------------------------------- phantom


def test_phantom_labels_match_the_blood_drawn_on_each_slice() -> None:
    runs = [
        ("subdural", 8, 20),
        ("intraventricular", 12, 16),
        ("epidural", 7, 11),
        ("intraparenchymal", 10, 18),
        ("subarachnoid", 6, 22),
    ]
    p = phantom_series(3, n_slices=30, image_size=128, lesions=runs, with_masks=True)
    assert p.hu.shape == (30, 128, 128)
    assert p.hu.dtype == np.float32
    assert p.lesion_runs == tuple(runs)
    expected = np.zeros((30, 6), np.uint8)
    for name, first, last in runs:
        expected[first : last + 1, CLASSES.index(name)] = 1
    expected[:, 5] = expected[:, :5].max(axis=1)
    assert np.array_equal(p.labels, expected)
    # Blood is drawn exactly where labelled, and nowhere else.
    assert np.array_equal(p.lesion_pixels > 0, p.labels[:, :5] == 1)
    assert p.masks is not None
    assert np.array_equal((p.masks >= 0.5).sum(axis=(2, 3)), p.lesion_pixels)
    # Lesions are hyperdense blood (50-90 HU) in their middle, fainter at the ends of the run.
    for name, first, last in runs:
        c = SUBTYPES.index(name)
        mid = (first + last) // 2
        core = p.masks[mid, c] >= 0.8
        assert 45 < float(np.median(p.hu[mid][core])) < 95, name
        end_core = p.masks[first, c] >= 0.8
        if end_core.any():
            assert np.median(p.hu[first][end_core]) < np.median(p.hu[mid][core]) - 5, name


def test_phantom_anatomy_has_air_bone_brain_and_csf_in_their_hu_ranges() -> None:
    p = phantom_series(5, n_slices=24, image_size=128, lesions=())
    assert not p.labels.any()
    assert not p.lesion_pixels.any()
    hu = p.hu
    assert abs(float(np.median(hu[:, :4, :4])) + 1000) < 15  # air in the corners
    k = 12  # a mid-head slice: ventricles present
    centre = hu[k, 44:84, 44:84]
    assert 20 < float(np.median(centre)) < 45  # brain
    assert (centre < 15).mean() > 0.03  # CSF in the ventricles
    assert 700 < float(np.percentile(hu[k], 99.5)) < 1600  # the skull
    # The head narrows from the skull base to the vertex.
    head_area = (hu > -500).sum(axis=(1, 2))
    assert head_area[-1] < 0.6 * head_area[8]


def test_phantom_is_deterministic_for_a_seed() -> None:
    a = phantom_series(7, n_slices=6, image_size=64, lesions="random")
    b = phantom_series(7, n_slices=6, image_size=64, lesions="random")
    c = phantom_series(8, n_slices=6, image_size=64, lesions="random")
    assert np.array_equal(a.hu, b.hu)
    assert a.lesion_runs == b.lesion_runs
    assert not np.array_equal(a.hu, c.hu)
    # The anatomy and lesions do not depend on the image size.
    big = phantom_series(7, n_slices=6, image_size=128, lesions="random")
    assert big.lesion_runs == a.lesion_runs
    assert np.array_equal(big.labels, a.labels)
    assert np.array_equal(big.slice_z, a.slice_z)


def test_phantom_random_lesions_form_runs_of_adjacent_slices() -> None:
    for seed in range(8):
        p = phantom_series(seed, n_slices=30, image_size=128)
        assert p.labels[:, 5].any()
        for c in range(6):
            ks = np.flatnonzero(p.labels[:, c])
            if ks.size:
                assert np.array_equal(ks, np.arange(ks[0], ks[-1] + 1)), (seed, c)
        assert np.array_equal(p.lesion_pixels > 0, p.labels[:, :5] == 1)


def test_phantom_rejects_runs_where_the_subtype_cannot_occur() -> None:
    with pytest.raises(
        ValueError, match=r"intraventricular run 0\.\.2 is outside the slices where it can occur"
    ):
        phantom_series(0, n_slices=30, image_size=64, lesions=[("intraventricular", 0, 2)])
    with pytest.raises(ValueError, match="unknown subtype 'any'"):
        phantom_series(0, n_slices=30, image_size=64, lesions=[("any", 10, 12)])


# --------------------------------------------------------------------------------------------- archive


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


def test_archive_has_one_file_per_image_and_six_label_rows_each(archive: Path) -> None:
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
    headers = [_read(p, stop_before_pixels=True) for p in files]
    studies = {ds.StudyInstanceUID for ds in headers}
    assert len(studies) == 24
    assert len({ds.SeriesInstanceUID for ds in headers}) == 24
    per_study: dict[str, int] = defaultdict(int)
    for ds in headers:
        per_study[ds.StudyInstanceUID] += 1
    assert all(20 <= n <= 40 for n in per_study.values())


def test_archive_reproduces_rsna_header_quirks(archive: Path) -> None:
    headers = [_read(p, stop_before_pixels=True) for p in sorted(archive.glob("*.dcm"))]
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
