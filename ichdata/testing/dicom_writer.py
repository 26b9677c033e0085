"""The project's one DICOM writer: CT slices with exactly the header a test asks for.

`write_ct_slice` writes tilted or coronal geometry, RSNA's 12-bit quirk, RescaleSlope ≠ 1, signed
or unsigned pixels, no InstanceNumber, multi-valued WindowCenter, `ID_` UIDs and compressed
transfer syntaxes; `stored_from_hu` turns HU into the stored values a scanner writes under a given
header; `add_reference_sequence` inserts the nested sequences hospital exports carry.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
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

__all__ = ["add_reference_sequence", "stored_from_hu", "write_ct_slice"]

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
    """Set an element without pydicom's value validation.

    `ID_…` UIDs are not valid UIDs (RSNA's quirk, reproduced on purpose), and tests write
    deliberately odd values through `extra`.
    """
    tag, default_vr = _tag_vr(keyword)
    ds[tag] = DataElement(tag, vr or default_vr, value, validation_mode=_IGNORE)


def _stored_range(bits_stored: int, pixel_representation: int) -> tuple[int, int, str]:
    """The lowest and highest stored value and the little-endian dtype of this pixel layout."""
    if pixel_representation:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1, "<i2"
    return 0, 2**bits_stored - 1, "<u2"


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
    lo, hi, dtype = _stored_range(bits_stored, pixel_representation)
    values = (hu - intercept) / slope if slope != 1.0 else hu - intercept
    return np.clip(np.rint(values), lo, hi).astype(dtype)


def _checked_pixels(stored: np.ndarray, bits_stored: int, pixel_representation: int, ts: UID) -> np.ndarray:
    """`stored` as the contiguous array the pixel data is written from; ValueError if the header cannot hold it."""
    arr = np.asarray(stored)
    if arr.ndim != 2:
        raise ValueError(f"stored must be 2-D (rows, cols), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"stored must hold integers, got {arr.dtype}; use stored_from_hu()")
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 1..16, got {bits_stored}")
    if pixel_representation not in (0, 1):
        raise ValueError(f"pixel_representation must be 0 or 1, got {pixel_representation}")
    lo, hi, dtype = _stored_range(bits_stored, pixel_representation)
    if arr.size:
        amin, amax = int(arr.min()), int(arr.max())
        if amin < lo or amax > hi:
            raise ValueError(
                f"stored values {amin}..{amax} do not fit {bits_stored} bits "
                f"{'signed' if pixel_representation else 'unsigned'} ({lo}..{hi})"
            )
    if ts == ExplicitVRBigEndian:
        dtype = ">" + dtype[1:]
    return np.ascontiguousarray(arr, dtype=dtype)


def _file_meta(image_id: str, ts: UID) -> FileMetaDataset:
    """The Part 10 file meta; a compressed syntax is set by `Dataset.compress` afterwards."""
    meta = FileMetaDataset()
    _put(meta, "MediaStorageSOPClassUID", CTImageStorage)
    _put(meta, "MediaStorageSOPInstanceUID", image_id)
    _put(meta, "TransferSyntaxUID", ExplicitVRLittleEndian if ts.is_compressed else ts)
    _put(meta, "ImplementationClassUID", PYDICOM_IMPLEMENTATION_UID)
    _put(meta, "ImplementationVersionName", "ICH_SYNTH")
    return meta


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
    # Long: a keyword argument per element and one `_put` each, so a test reads which tags it sets.
    ts = UID(transfer_syntax)
    arr = _checked_pixels(stored, bits_stored, pixel_representation, ts)
    rows, cols = arr.shape

    ds = Dataset()
    ds.file_meta = _file_meta(image_id, ts)
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
        native = str(arr.dtype.str).replace("<", "=")
        ds.compress(ts, arr.astype(native, copy=False), generate_instance_uid=False)
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
    """Insert a two-level sequence before the pixel data of the file at `path`, as hospital exports have.

    The sequence is a Referenced Image Sequence with a coded purpose and an empty item, of defined
    length or of undefined length with delimiters.

    Returns:
        The path.
    """
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
