"""Reading CT slices: HU, header facts, the rendered fast path, and every set-aside reason."""

from __future__ import annotations

import pickle
import re
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config as dicom_config
from pydicom.data import get_testdata_file as _get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from ichdata.dicom import (
    SliceError,
    SliceMeta,
    header,
    is_dicom,
    read_header,
    read_header_layout,
    read_rendered,
    read_slice,
    walk,
)
from ichdata.reasons import READER_REASONS
from ichdata.testing import add_reference_sequence, stored_from_hu, write_ct_slice
from ichdata.windows import window_hu


def _testdata(name: str) -> str:
    """The path of a file pydicom ships."""
    path = _get_testdata_file(name)
    assert isinstance(path, str), name
    return path


def _hu(shape: tuple[int, int] = (64, 80), seed: int = 0) -> np.ndarray:
    """Integer HU from air to dense bone."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 3000, shape).astype(np.float64)


def _write(
    path: Path,
    hu: np.ndarray | None = None,
    *,
    stored: np.ndarray | None = None,
    image_id: str | None = None,
    **kwargs: Any,
) -> Path:
    header = {
        k: kwargs[k] for k in ("slope", "intercept", "bits_stored", "pixel_representation") if k in kwargs
    }
    if stored is None:
        stored = stored_from_hu(_hu() if hu is None else hu, **header)
    write_ct_slice(
        path,
        stored,
        image_id=image_id or path.stem,
        study_uid=kwargs.pop("study_uid", "ID_study1"),
        series_uid=kwargs.pop("series_uid", "ID_series1"),
        patient_id=kwargs.pop("patient_id", "ID_patient1"),
        image_position=kwargs.pop("image_position", (-125.0, -125.0, 42.5)),
        **kwargs,
    )
    return path


# --- HU ------------------------------------------------------------------------------------------------


def test_reads_hu_and_exactly_the_meta(tmp_path: Path) -> None:
    hu = _hu()
    path = _write(
        tmp_path / "ID_63eb1e259.dcm", hu, instance_number=7, pixel_spacing=(0.5, 0.45), patient_id="ID_p9"
    )
    values, meta = read_slice(path)
    assert values.dtype == np.float32
    assert values.shape == (64, 80)
    assert np.array_equal(values, hu)
    assert meta == SliceMeta(
        image_id="ID_63eb1e259",
        study_uid="ID_study1",
        series_uid="ID_series1",
        patient_id="ID_p9",
        slice_position=42.5,
        instance_number=7,
        pixel_spacing=(0.5, 0.45),
        rows=64,
        cols=80,
    )
    assert read_header(path) == meta


@pytest.mark.parametrize(
    ("bits_stored", "pixel_representation", "slope", "intercept"),
    [
        (16, 1, 1.0, -1024.0),
        (16, 0, 1.0, -1024.0),
        (12, 0, 1.0, -1024.0),  # 12-bit unsigned but a sane intercept: no correction
        (12, 1, 1.0, -1024.0),
        (16, 1, 0.5, -1024.0),
        (16, 1, 2.0, -1000.0),
        (16, 0, 0.25, -3000.0),
    ],
)
def test_hu_is_stored_times_slope_plus_intercept(
    tmp_path: Path, bits_stored: int, pixel_representation: int, slope: float, intercept: float
) -> None:
    header: dict[str, Any] = {
        "bits_stored": bits_stored,
        "pixel_representation": pixel_representation,
        "slope": slope,
        "intercept": intercept,
    }
    stored = stored_from_hu(_hu(), **header)
    path = _write(tmp_path / "ID_x.dcm", stored=stored, **header)
    values, _ = read_slice(path)
    assert np.array_equal(values, (stored.astype(np.float64) * slope + intercept).astype(np.float32))


@pytest.mark.parametrize("intercept", [0.0, 1.0])
def test_rsna_12bit_correction(tmp_path: Path, intercept: float) -> None:
    # BitsStored 12, unsigned, intercept > -100: add 1000, subtract 4096 from values ≥ 4096, intercept -1000.
    stored = np.array([[0, 24, 3096, 4095]], dtype=np.uint16)
    path = _write(
        tmp_path / "ID_a.dcm", stored=stored, bits_stored=12, pixel_representation=0, intercept=intercept
    )
    assert read_slice(path)[0].tolist() == [[0.0, 24.0, -1000.0, -1.0]]
    # With the broken encoding RSNA shipped (hu mod 4096), the correction recovers the HU.
    hu = _hu()
    path = _write(tmp_path / "ID_b.dcm", hu, bits_stored=12, pixel_representation=0, intercept=intercept)
    assert np.array_equal(read_slice(path)[0], np.clip(hu, -1000, 3095))


def test_no_correction_when_intercept_is_sane(tmp_path: Path) -> None:
    stored = np.array([[0, 24, 3096, 4095]], dtype=np.uint16)
    path = _write(
        tmp_path / "ID_a.dcm", stored=stored, bits_stored=12, pixel_representation=0, intercept=-1024.0
    )
    assert read_slice(path)[0].tolist() == [[-1024.0, -1000.0, 2072.0, 3071.0]]


@pytest.mark.parametrize("signed", [True, False])
def test_unused_high_bits_are_ignored(tmp_path: Path, signed: bool) -> None:
    # Bits above (0028,0101) Bits Stored may hold garbage (old overlays); values come from the low 12 bits.
    rng = np.random.default_rng(3)
    low = rng.integers(-2048, 2048, (16, 16)) if signed else rng.integers(0, 4096, (16, 16))
    raw = ((low & 0xFFF) | (rng.integers(0, 16, (16, 16)) << 12)).astype(np.uint16)
    stored = raw.view(np.int16) if signed else raw
    path = _write(
        tmp_path / "ID_g.dcm",
        stored=stored,
        bits_stored=16,
        pixel_representation=int(signed),
        intercept=-1024.0,
        extra={"BitsStored": 12, "HighBit": 11},
    )
    values, _ = read_slice(path)
    assert np.array_equal(values, low - 1024.0)
    rendered, _ = read_rendered(path, size=8)
    assert np.abs(rendered.astype(int) - window_hu(low - 1024.0, 8)).max() <= 1


@pytest.mark.parametrize(("bits", "signed"), [(8, False), (8, True), (32, True), (32, False)])
def test_8_and_32_bit_pixels(tmp_path: Path, bits: int, signed: bool) -> None:
    # write_ct_slice writes 16-bit pixels; the same bytes re-declared as 16×16×8 or 16×8×32 bit.
    rng = np.random.default_rng(bits)
    raw = rng.integers(0, 2**16, (16, 16)).astype(np.uint16)
    cols = 16 * 16 // bits
    path = _write(
        tmp_path / "ID_b.dcm",
        stored=raw,
        bits_stored=16,
        pixel_representation=0,
        intercept=-1000.0,
        extra={
            "BitsAllocated": bits,
            "BitsStored": bits,
            "HighBit": bits - 1,
            "PixelRepresentation": int(signed),
            "Columns": cols,
        },
    )
    expected = np.frombuffer(raw.tobytes(), dtype=f"<{'i' if signed else 'u'}{bits // 8}").reshape(16, cols)
    values, meta = read_slice(path)
    assert (meta.rows, meta.cols) == (16, cols)
    assert np.array_equal(values, (expected.astype(np.float64) - 1000.0).astype(np.float32))
    rendered, _ = read_rendered(path, size=8)
    assert np.abs(rendered.astype(int) - window_hu(values, 8)).max() <= 1


_COMPRESSED_AND_OTHER_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
]


@pytest.mark.parametrize("transfer_syntax", _COMPRESSED_AND_OTHER_SYNTAXES, ids=lambda ts: ts.name)
def test_transfer_syntaxes_decode_to_the_same_hu(tmp_path: Path, transfer_syntax: str) -> None:
    hu = _hu()
    path = _write(tmp_path / "ID_c.dcm", hu, transfer_syntax=transfer_syntax, instance_number=3)
    values, meta = read_slice(path)
    assert np.array_equal(values, hu)
    assert meta.instance_number == 3
    assert read_header(path) == meta
    rendered, meta2 = read_rendered(path, size=32)
    assert meta2 == meta
    assert np.abs(rendered.astype(int) - window_hu(hu, 32)).max() <= 1


def test_pydicom_ct_small(tmp_path: Path) -> None:
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    values, meta = read_slice(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(values, expected.astype(np.float32))
    assert meta.image_id == ds.SOPInstanceUID
    assert meta.study_uid == ds.StudyInstanceUID
    assert meta.series_uid == ds.SeriesInstanceUID
    assert meta.patient_id == "1CT1"
    assert meta.instance_number == 1
    assert meta.slice_position == pytest.approx(float(ds.ImagePositionPatient[2]))
    assert (meta.rows, meta.cols) == (128, 128)
    rendered, _ = read_rendered(path)  # 128 -> 256: area resize upsamples by replication
    assert np.abs(rendered.astype(int) - window_hu(values)).max() <= 1
    # Extensionless copies (hospital exports) are recognised by content.
    copy = tmp_path / "IM000001"
    copy.write_bytes(Path(path).read_bytes())
    assert is_dicom(copy)
    assert read_header(copy) == meta


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_pydicom_jpeg2000_ct(name: str) -> None:
    # Real head CT (CQ500) in lossy JPEG 2000, and a J2K stream whose signedness contradicts the header.
    path = _testdata(name)
    ds = pydicom.dcmread(path)
    values, meta = read_slice(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(values, expected.astype(np.float32))
    assert (meta.rows, meta.cols) == (512, 512)
    rendered, _ = read_rendered(path)
    assert np.abs(rendered.astype(int) - window_hu(values)).max() <= 1


def _jpeg_lossless_sv1(image: np.ndarray) -> bytes:
    """A minimal JPEG Lossless encoder (process 14, selection value 1: predict from the left).

    For one 16-bit grey component. Nothing installed encodes this syntax, the commonest in hospital
    archives.
    """
    rows, cols = image.shape
    x = image.astype(np.uint16).astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << 15  # 2**(P-1) for the first sample
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]  # first column: the sample above
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)
    out = bytearray()
    acc, n = 0, 0

    def put(value: int, length: int) -> None:
        nonlocal acc, n
        acc = (acc << length) | (value & ((1 << length) - 1))
        n += length
        while n >= 8:
            byte = (acc >> (n - 8)) & 0xFF
            out.extend([byte, 0] if byte == 0xFF else [byte])  # byte stuffing
            n -= 8
        acc &= (1 << n) - 1

    for d in diff.reshape(-1).tolist():
        category = int(abs(d)).bit_length()
        put(category, 5)  # Huffman table: the 17 categories, each a 5-bit code equal to itself
        if 0 < category < 16:  # category 16 (difference 32768) has no extra bits
            put(d if d > 0 else d - 1, category)
    if n:
        put((1 << (8 - n)) - 1, 8 - n)

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    frame = bytes([16]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    huffman = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    scan = bytes([1, 1, 0x00, 1, 0, 0])
    return (
        b"\xff\xd8"
        + segment(0xC3, frame)
        + segment(0xC4, huffman)
        + segment(0xDA, scan)
        + bytes(out)
        + b"\xff\xd9"
    )


def test_jpeg_lossless_sv1(tmp_path: Path) -> None:
    stored = stored_from_hu(_hu())
    stored[3, 4:6] = [0, -32768]  # a difference of 32768: the category without extra bits
    path = _write(tmp_path / "ID_jl.dcm", stored=stored)

    def to_jpeg_lossless(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([_jpeg_lossless_sv1(stored)])
        ds["PixelData"].VR = "OB"

    _rewrite(path, to_jpeg_lossless)
    values, meta = read_slice(path)
    assert np.array_equal(values, stored.astype(np.float64) - 1024.0)
    assert read_header(path) == meta
    rendered, _ = read_rendered(path, size=32)
    assert np.abs(rendered.astype(int) - window_hu(values, 32)).max() <= 1


def _as_ct(source: str, out: Path) -> Path:
    """The MR_small variants pydicom ships, relabelled CT ((0008,0060) Modality 'MR' -> 'CT', same length)."""
    data = Path(_testdata(source)).read_bytes()
    for tag in (
        b"\x08\x00\x60\x00CS\x02\x00",
        b"\x08\x00\x60\x00\x02\x00\x00\x00",
        b"\x00\x08\x00\x60CS\x00\x02",
    ):
        at = data.find(tag + b"MR")
        if at >= 0:
            out.write_bytes(data[: at + len(tag)] + b"CT" + data[at + len(tag) + 2 :])
            return out
    raise AssertionError(f"no Modality element found in {source}")


@pytest.mark.parametrize(
    "variant",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_pydicom_compressed_variants_decode_like_the_original(tmp_path: Path, variant: str) -> None:
    original, _ = read_slice(_as_ct("MR_small.dcm", tmp_path / "original.dcm"))
    values, meta = read_slice(_as_ct(variant, tmp_path / variant))
    assert (meta.rows, meta.cols) == (64, 64)
    assert np.array_equal(values, original)


def test_rendered_is_within_one_of_window_hu_on_full_size_slices(tmp_path: Path) -> None:
    for shape in [(512, 512), (638, 490)]:
        path = _write(tmp_path / f"ID_{shape[0]}.dcm", _hu(shape, seed=shape[1]))
        rendered, meta = read_rendered(path)
        hu, _ = read_slice(path)
        assert rendered.shape == (3, 256, 256)
        assert rendered.dtype == np.uint8
        assert np.abs(rendered.astype(int) - window_hu(hu)).max() <= 1
        assert (meta.rows, meta.cols) == shape


def test_rsna_uids_do_not_warn(tmp_path: Path) -> None:
    path = _write(tmp_path / "ID_6431af929.dcm", image_id="ID_6431af929", study_uid="ID_s", series_uid="ID_e")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_header(path)
        read_slice(path)
        read_rendered(path)
    assert [str(w.message) for w in caught] == []


# --- is_dicom ------------------------------------------------------------------------------------------


def test_is_dicom_by_content_not_name(tmp_path: Path) -> None:
    good = _write(tmp_path / "ID_ok.dcm")
    renamed = tmp_path / "no_extension"
    renamed.write_bytes(good.read_bytes())
    fake = tmp_path / "scan.dcm"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    assert is_dicom(good)
    assert is_dicom(renamed)
    assert not is_dicom(fake)
    assert not is_dicom(tmp_path)
    assert not is_dicom(tmp_path / "absent")
    assert is_dicom(_testdata("DICOMDIR"))  # DICOM, but not a slice


# --- set-aside reasons ---------------------------------------------------------------------------------


def _cut(path: Path, at: int) -> Path:
    path.write_bytes(path.read_bytes()[:at])
    return path


def _rewrite(path: Path, change: Callable[[pydicom.Dataset], None]) -> Path:
    ds = pydicom.dcmread(path)
    change(ds)
    with dicom_config.disable_value_validation():  # the ID_ UIDs, written on purpose
        ds.save_as(path, enforce_file_format=True)
    return path


def _mpeg2(ds: pydicom.Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 Main Profile: no decoder
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"


def _private_syntax(path: Path) -> Path:
    data = path.read_bytes()
    return _patch(path, data.index(b"1.2.840.10008.1.2.1\x00"), b"1.2.840.99999.1.2.1\x00")


def _patch(path: Path, at: int, new: bytes) -> Path:
    data = bytearray(path.read_bytes())
    data[at : at + len(new)] = new
    path.write_bytes(bytes(data))
    return path


def _rle_bad_segment_offset(path: Path) -> Path:
    data = path.read_bytes()
    pixel = data.rindex(b"\xe0\x7f\x10\x00OB")
    bot = pixel + 12
    bot_length = int.from_bytes(data[bot + 4 : bot + 8], "little")
    fragment = bot + 8 + bot_length + 8
    assert int.from_bytes(data[fragment : fragment + 8], "little") == 2 | 64 << 32  # 2 segments, 1st at 64
    return _patch(path, fragment + 4, (0xFFFF0000).to_bytes(4, "little"))  # first segment far past the end


def _sparse_huge(path: Path, side: int = 40000) -> Path:
    """A slice whose header declares `side`×`side` 16-bit pixels, with all of its pixel data present.

    The file is sparse (the pixel data is a hole the file system does not store): 3.2 GB declared,
    a few kB on disk. A reader that trusted the header would read and render all of it.
    """
    W(path, extra={"Rows": side, "Columns": side})
    data = bytearray(path.read_bytes())
    pixel = data.rindex(b"\xe0\x7f\x10\x00OW")
    length = side * side * 2
    data[pixel + 8 : pixel + 12] = length.to_bytes(4, "little")
    path.write_bytes(bytes(data[: pixel + 12]))
    with path.open("r+b") as f:
        f.truncate(pixel + 12 + length)
    return path


def _text(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


W = _write  # brevity in the table below

# reason -> (file maker, pattern the message must match after "<file name>: ")
CASES: dict[str, list[tuple[Callable[[Path], Path], str]]] = {
    "not_dicom": [
        (
            lambda d: _text(d / "notes.dcm", b"patient list\n" * 20),
            r"^no DICOM preamble: b'DICM' expected at byte 128$",  # not what the file holds there
        ),
        (
            lambda d: _text(d / "tiny.dcm", b"abc"),
            r"file is 3 bytes, shorter than the 132-byte DICOM preamble",
        ),
        (
            lambda d: _text(d / "no_meta.dcm", Path(_testdata("ExplVR_LitEndNoMeta.dcm")).read_bytes()),
            r"no DICOM preamble",
        ),
    ],
    "empty": [(lambda d: _text(d / "ID_e.dcm", b""), r"file is empty \(0 bytes\)")],
    "truncated": [
        (
            lambda d: _cut(W(d / "ID_t1.dcm"), -100),
            r"file ends at 10,\d+ bytes, inside the pixel data \(10,\d+ bytes expected\)",
        ),
        (lambda d: _cut(W(d / "ID_t2.dcm"), 300), r"file ends inside"),
        (lambda d: _cut(W(d / "ID_t3.dcm"), 140), r"file ends inside the file meta group at 140 bytes"),
        (
            lambda d: _cut(W(d / "ID_t4.dcm", transfer_syntax=RLELossless), -50),
            r"inside the compressed pixel data",
        ),
    ],
    "no_pixel_data": [
        (lambda d: W(d / "ID_n.dcm", extra={"PixelData": None}), r"no \(7FE0,0010\) Pixel Data element")
    ],
    "size_mismatch": [
        (
            lambda d: W(d / "ID_6431af929.dcm", stored=np.zeros((256, 512), np.int16), extra={"Rows": 512}),
            r"^pixel data is 262,144 bytes, 524,288 expected for 512×512×16 bit$",
        ),
        (
            lambda d: W(d / "ID_huge.dcm", extra={"Rows": 65535, "Columns": 65535}),
            r"^Rows×Columns 65,535×65,535 is larger than 4,096×4,096, the largest CT slice read",
        ),
        (
            lambda d: W(d / "ID_hugec.dcm", transfer_syntax=RLELossless, extra={"Rows": 60000}),
            r"Rows×Columns 60,000×80 is larger than 4,096×4,096",
        ),
        (lambda d: _sparse_huge(d / "ID_hugesparse.dcm"), r"Rows×Columns 40,000×40,000 is larger than"),
    ],
    "not_ct": [
        (lambda d: W(d / "ID_mr.dcm", modality="MR"), r"^\(0008,0060\) Modality is 'MR', 'CT' expected$"),
        (lambda d: W(d / "ID_nomod.dcm", extra={"Modality": None}), r"Modality is missing, 'CT' expected"),
    ],
    "colour": [
        (
            lambda d: W(d / "ID_rgb.dcm", extra={"SamplesPerPixel": 3}),
            r"\(0028,0002\) Samples per Pixel is 3, 1 expected",
        ),
        (
            lambda d: W(d / "ID_pal.dcm", extra={"PhotometricInterpretation": "PALETTE COLOR"}),
            r"Photometric Interpretation is 'PALETTE COLOR', MONOCHROME1 or MONOCHROME2 expected",
        ),
    ],
    "localizer": [
        (
            lambda d: W(d / "ID_loc.dcm", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
            r"\(0008,0008\) Image Type is ORIGINAL\\PRIMARY\\LOCALIZER: a localizer/scout",
        )
    ],
    "multi_frame": [
        (
            lambda d: W(d / "ID_mf.dcm", extra={"NumberOfFrames": "2"}),
            r"\(0028,0008\) Number of Frames is 2, 1 expected",
        ),
        (
            lambda d: W(
                d / "ID_mfi.dcm", transfer_syntax=ImplicitVRLittleEndian, extra={"NumberOfFrames": "3"}
            ),
            r"Number of Frames is 3, 1 expected",
        ),
    ],
    "missing_geometry": [
        (
            lambda d: W(d / "ID_g1.dcm", extra={"ImagePositionPatient": None}),
            r"^\(0020,0032\) Image Position \(Patient\) is missing, 3 numbers expected$",
        ),
        (
            lambda d: W(d / "ID_g2.dcm", extra={"ImageOrientationPatient": None}),
            r"\(0020,0037\) Image Orientation \(Patient\) is missing, 6 numbers expected",
        ),
        (
            lambda d: W(d / "ID_g3.dcm", extra={"PixelSpacing": None}),
            r"\(0028,0030\) Pixel Spacing is missing",
        ),
        (
            lambda d: W(d / "ID_g4.dcm", extra={"ImagePositionPatient": ["1", "2"]}),
            r"Image Position \(Patient\) is 1\\2, 3 finite numbers expected",
        ),
        (lambda d: W(d / "ID_g5.dcm", image_orientation=(1, 0, 0, 1, 0, 0)), r"do not span a plane"),
    ],
    "undecodable": [
        (
            lambda d: _rle_bad_segment_offset(W(d / "ID_u1.dcm", transfer_syntax=RLELossless)),
            r"^RLE Lossless pixel data cannot be decoded: .*Invalid segment offset found in the RLE header",
        ),
        (lambda d: W(d / "ID_u2.dcm", extra={"Rows": None}), r"\(0028,0010\) Rows is missing"),
        (
            lambda d: W(d / "ID_u3.dcm", extra={"BitsAllocated": 12}),
            r"Bits Allocated is 12, 8, 16 or 32 expected",
        ),
    ],
    "unsupported_transfer_syntax": [
        (
            lambda d: _rewrite(W(d / "ID_v1.dcm"), _mpeg2),
            r"transfer syntax 1\.2\.840\.10008\.1\.2\.4\.100 \(MPEG2.*\) has no pixel data decoder",
        ),
        (
            lambda d: _private_syntax(W(d / "ID_v2.dcm")),
            r"Transfer Syntax UID 1\.2\.840\.99999\.1\.2\.1 is not a known transfer syntax",
        ),
    ],
    "not_image": [
        (
            lambda d: _text(d / "DICOMDIR", Path(_testdata("DICOMDIR")).read_bytes()),
            r"a DICOMDIR \(media directory\), not an image",
        )
    ],
    "missing_uid": [
        (
            lambda d: W(d / "ID_m1.dcm", extra={"SOPInstanceUID": None}),
            r"\(0008,0018\) SOP Instance UID is missing",
        ),
        (
            lambda d: W(d / "ID_m2.dcm", extra={"SeriesInstanceUID": None}),
            r"\(0020,000E\) Series Instance UID is missing",
        ),
    ],
}

_PIXEL_ONLY = {"undecodable/0"}  # found only when the pixel data is decoded


def test_every_reason_is_exercised() -> None:
    assert set(CASES) == set(READER_REASONS)


@pytest.mark.parametrize(
    ("reason", "index"), [(reason, i) for reason, cases in CASES.items() for i in range(len(cases))]
)
def test_set_aside_reasons(tmp_path: Path, reason: str, index: int) -> None:
    make, pattern = CASES[reason][index]
    path = make(tmp_path)
    readers: list[Callable[[Path], object]] = [read_slice, read_rendered]
    if f"{reason}/{index}" not in _PIXEL_ONLY:
        readers.append(read_header)
    for reader in readers:
        with pytest.raises(SliceError) as info:
            reader(path)
        error = info.value
        assert error.reason == reason, f"{reader.__name__}: {error}"
        assert error.path == str(path)
        assert str(error) == f"{path.name}: {error.detail}"
        assert re.search(pattern, error.detail), error.detail
    if f"{reason}/{index}" in _PIXEL_ONLY:
        read_header(path)  # the header alone is fine


def test_huge_declared_size_allocates_nothing(tmp_path: Path) -> None:
    path = W(tmp_path / "ID_huge.dcm", extra={"Rows": 65535, "Columns": 65535})
    tracemalloc.start()
    try:
        with pytest.raises(SliceError, match="65,535×65,535 is larger than 4,096×4,096"):
            read_slice(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_slice_error_pickles_and_checks_its_reason() -> None:
    error = SliceError("/data/ID_1.dcm", "truncated", "file ends at 10 bytes")
    again = pickle.loads(pickle.dumps(error))
    assert (again.path, again.reason, again.detail, str(again)) == (
        "/data/ID_1.dcm",
        "truncated",
        "file ends at 10 bytes",
        "ID_1.dcm: file ends at 10 bytes",
    )
    with pytest.raises(ValueError, match="unknown reason 'broken'"):
        SliceError("x.dcm", "broken", "?")


@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    d = tmp_path_factory.mktemp("fuzz")
    hu = _hu((24, 20))
    return [
        _write(d / "ID_f1.dcm", hu).read_bytes(),
        _write(d / "ID_f2.dcm", hu, transfer_syntax=RLELossless).read_bytes(),
        _write(d / "ID_f3.dcm", hu, transfer_syntax=ImplicitVRLittleEndian).read_bytes(),
    ]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    source=st.integers(0, 2),
    edits=st.lists(st.tuples(st.integers(132, 2000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_corrupt_files_raise_only_slice_errors(
    tmp_path: Path, fuzz_sources: list[bytes], source: int, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(fuzz_sources[source])
    for at, value in edits:
        if at < len(data):
            data[at] = value
    path = tmp_path / "ID_fuzz.dcm"
    path.write_bytes(bytes(data[:cut] if cut is not None else data))
    reason: str
    try:
        rendered, meta = read_rendered(path, size=8)
    except SliceError as e:
        reason = e.reason
    else:
        reason = "ok"
        assert rendered.shape == (3, 8, 8)
        assert isinstance(meta, SliceMeta)
    assert reason in (*READER_REASONS, "ok")


# --- the header walk (`walk.walk_header`) against pydicom's reader ------------------------------------------
#
# `read_header` walks the common files itself and leaves the rest to `pydicom.dcmread`. Whatever path a
# file takes, the outcome (the meta and pixel layout, or the SliceError's reason and message) must be
# the one pydicom's path gives.


def _header_outcome(path: Path, fast: bool) -> tuple[Any, ...]:
    old = header._FAST_HEADER
    header._FAST_HEADER = fast
    try:
        return ("ok", *read_header_layout(path))
    except SliceError as e:
        return (e.reason, e.detail)
    finally:
        header._FAST_HEADER = old


def _walked(path: Path) -> bool:
    """Whether the walk reads this file's header itself (rather than handing it to pydicom)."""
    with open(path, "rb") as f:
        head = f.read(144)
        size = path.stat().st_size
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
            return False
        meta_end = 144 + int.from_bytes(head[140:144], "little")
        return walk.walk_header(f, size, meta_end) is not None


def _with_sequence(path: Path, undefined_length: bool, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """A slice with a two-level sequence before the pixel data (as hospital exports have)."""
    _write(path, _hu((16, 12)), transfer_syntax=transfer_syntax)
    return add_reference_sequence(path, undefined_length=undefined_length)


def test_header_walk_reads_the_common_files(tmp_path: Path) -> None:
    common = [
        _write(tmp_path / "ID_w1.dcm"),
        _write(tmp_path / "ID_w2.dcm", transfer_syntax=ImplicitVRLittleEndian),
        _write(tmp_path / "ID_w3.dcm", transfer_syntax=RLELossless),
        _write(tmp_path / "ID_w4.dcm", bits_stored=12, pixel_representation=0, intercept=0.0),
        _with_sequence(tmp_path / "ID_w5.dcm", undefined_length=False),
        _with_sequence(
            tmp_path / "ID_w6.dcm", undefined_length=False, transfer_syntax=ImplicitVRLittleEndian
        ),
    ]
    left_to_pydicom = [
        _write(tmp_path / "ID_p1.dcm", transfer_syntax=ExplicitVRBigEndian),
        _write(tmp_path / "ID_p2.dcm", transfer_syntax=DeflatedExplicitVRLittleEndian),
        _with_sequence(tmp_path / "ID_p3.dcm", undefined_length=True),
    ]
    assert [_walked(p) for p in common] == [True] * len(common)
    assert [_walked(p) for p in left_to_pydicom] == [False] * len(left_to_pydicom)
    for p in common + left_to_pydicom:
        fast = _header_outcome(p, fast=True)
        assert fast[0] == "ok", fast
        assert fast == _header_outcome(p, fast=False), p.name


@pytest.mark.parametrize(
    ("reason", "index"), [(reason, i) for reason, cases in CASES.items() for i in range(len(cases))]
)
def test_header_walk_fails_like_pydicom(tmp_path: Path, reason: str, index: int) -> None:
    path = CASES[reason][index][0](tmp_path)
    assert _header_outcome(path, fast=True) == _header_outcome(path, fast=False)


def test_header_walk_agrees_with_pydicom_on_its_test_files(tmp_path: Path) -> None:
    # The files pydicom ships (its larger test files download on demand, which nothing here may do).
    data = Path(pydicom.__file__).parent / "data"
    files = sorted(p for d in ("test_files", "charset_files") for p in (data / d).rglob("*") if p.is_file())
    assert len(files) > 80
    walked = 0
    for p in files:
        assert _header_outcome(p, fast=True) == _header_outcome(p, fast=False), p.name
        walked += _walked(p)
    assert walked > 40  # the comparison covers the walk, not only files it hands over


@pytest.fixture(scope="module")
def walk_fuzz_sources(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    d = tmp_path_factory.mktemp("walkfuzz")
    hu = _hu((24, 20))
    return [
        _write(d / "ID_f1.dcm", hu).read_bytes(),
        _write(d / "ID_f2.dcm", hu, transfer_syntax=RLELossless).read_bytes(),
        _write(d / "ID_f3.dcm", hu, transfer_syntax=ImplicitVRLittleEndian).read_bytes(),
        _with_sequence(d / "ID_f4.dcm", undefined_length=False).read_bytes(),
        _with_sequence(
            d / "ID_f5.dcm", undefined_length=False, transfer_syntax=ImplicitVRLittleEndian
        ).read_bytes(),
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    source=st.integers(0, 4),
    edits=st.lists(st.tuples(st.integers(0, 1400), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 1600)),
)
def test_header_walk_agrees_with_pydicom_on_corrupt_files(
    tmp_path: Path, walk_fuzz_sources: list[bytes], source: int, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(walk_fuzz_sources[source])
    for at, value in edits:
        if at < len(data):
            data[at] = value
    path = tmp_path / "ID_fuzz.dcm"
    path.write_bytes(bytes(data[:cut] if cut is not None else data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about some corrupt values, in both paths alike
        assert _header_outcome(path, fast=True) == _header_outcome(path, fast=False)
