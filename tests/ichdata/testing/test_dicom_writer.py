"""The DICOM writer: `write_ct_slice` and `stored_from_hu`."""

from __future__ import annotations

from collections.abc import Callable
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

from ichdata.dicom import read_slice
from ichdata.testing import stored_from_hu, write_ct_slice

IDS: dict[str, Any] = {
    "image_id": "ID_0a1b2c3d4",
    "study_uid": "ID_5e6f7a8b9c",
    "series_uid": "ID_d0e1f2a3b4",
    "patient_id": "ID_c5d6e7f8",
}


def _rsna_correct(stored: np.ndarray, intercept: float) -> np.ndarray:
    """DESIGN.md step 1, written out plainly for the tests."""
    x = stored.astype(np.int64) + 1000
    x[x >= 4096] -= 4096
    return (x - 1000).astype(np.float64)


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
    read_dicom: Callable[..., pydicom.Dataset],
    tmp_path: Path,
    bits_stored: int,
    pixel_representation: int,
    slope: float,
    intercept: float,
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
    ds = read_dicom(path)
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
    read_dicom: Callable[..., pydicom.Dataset], tmp_path: Path, transfer_syntax: str, signed: bool
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
    ds = read_dicom(path)
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


def test_write_ct_slice_extra_overrides_and_removes_elements(
    read_dicom: Callable[..., pydicom.Dataset], tmp_path: Path
) -> None:
    path = tmp_path / "x.dcm"
    extra = {"ImagePositionPatient": None, "Rows": 600, "Modality": "MR", "GantryDetectorTilt": "12.5"}
    write_ct_slice(path, np.zeros((4, 6), np.int16), **IDS, image_position=(0, 0, 0), extra=extra)
    ds = read_dicom(path, stop_before_pixels=True)
    assert "ImagePositionPatient" not in ds
    assert ds.Rows == 600
    assert ds.Modality == "MR"
    assert float(ds.GantryDetectorTilt) == 12.5
    assert "ImageOrientationPatient" in ds
