"""The header checks: one slice's header parsed, checked in a fixed order, and summarised.

`parse_header` reads the header through the walk (`walk.py`) where it applies and through pydicom
otherwise, with identical results, then checks it step by step in the order of `READER_REASONS`, so
that a file with several faults always gets the same reason. It returns the `SliceMeta` and the
`PixelLayout`; it never reads the pixel values (only the 8-byte item headers of compressed data).
"""

from __future__ import annotations

import math
import os
import struct
from typing import BinaryIO, NamedTuple

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ichdata.dicom import tags
from ichdata.dicom.hu import HuKey, rsna_12bit_applies
from ichdata.dicom.meta import PixelLayout, SliceError, SliceMeta
from ichdata.dicom.tags import UNDEFINED_LENGTH, describe
from ichdata.dicom.values import (
    Header,
    floats,
    integer,
    joined,
    last_element_end,
    require_floats,
    require_positive,
    require_text,
    text,
    uint,
    values,
)
from ichdata.dicom.walk import walk_header
from ichdata.order import slice_position
from ichdata.reasons import Reason

__all__ = ["MAX_SIDE", "check_side", "parse_header"]

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_NATIVE = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
}
#: The largest Rows and Columns read (the cap of the README's `size_mismatch`): a slice that declares
#: more is set aside from its header, before its pixel data is read or a buffer of the declared size
#: is allocated (compressed or not). Head CT is at most 1024×1024 in practice; the cap bounds a
#: worker's memory per slice (4096×4096 at 32 bits is 64 MiB).
MAX_SIDE = 4096
#: Read headers with the walk where it applies (the tests turn it off to compare with pydicom).
_FAST_HEADER = True


class _PixelFormat(NamedTuple):
    """The header's description of the stored values."""

    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    hu_key: HuKey


def parse_header(path: str | os.PathLike[str], f: BinaryIO, size: int) -> tuple[SliceMeta, PixelLayout]:
    """Parse and check the header of the open file `f` (`size` bytes); leave `f` anywhere.

    Raises:
        SliceError: for every reason the header and the file size reveal.
    """
    meta_end, walkable = _check_file_meta(path, f, size)
    meta_ds, ds, stop = _dataset(path, f, size, meta_end, walkable)
    ts = _transfer_syntax(path, meta_ds)
    at_pixels, inline = _find_pixel_data(path, f, size, ts, ds, stop, meta_end)
    photometric = _check_image_kind(path, meta_ds, ds)
    image_id = require_text(path, ds, tags.SOP_INSTANCE, "SOP Instance UID")
    study_uid = require_text(path, ds, tags.STUDY_UID, "Study Instance UID")
    series_uid = require_text(path, ds, tags.SERIES_UID, "Series Instance UID")
    position_along_normal, spacing = _geometry(path, ds)
    number = integer(ds, tags.INSTANCE_NUMBER)
    _check_decoder(path, ts)
    fmt = _pixel_format(path, ds)
    if not at_pixels:
        raise SliceError(path, Reason.NO_PIXEL_DATA, "no (7FE0,0010) Pixel Data element")
    value_offset, value_length = _pixel_extent(path, f, size, ts, stop, inline, fmt)
    meta = SliceMeta(
        image_id=image_id,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=text(ds, tags.PATIENT_ID) or "",
        slice_position=position_along_normal,
        instance_number=number,
        pixel_spacing=spacing,
        rows=fmt.rows,
        cols=fmt.cols,
    )
    layout = PixelLayout(
        transfer_syntax=ts,
        encapsulated=ts not in _NATIVE,
        big_endian=ts == ExplicitVRBigEndian,
        rows=fmt.rows,
        cols=fmt.cols,
        bits_allocated=fmt.bits_allocated,
        bits_stored=fmt.bits_stored,
        signed=fmt.signed,
        photometric=photometric,
        value_offset=value_offset,
        value_length=value_length,
        hu_key=fmt.hu_key,
        inline=inline,
        element_offset=stop if inline is None else -1,
        file_size=size,
    )
    return meta, layout


def _check_file_meta(path: str | os.PathLike[str], f: BinaryIO, size: int) -> tuple[int | None, bool]:
    """Check the preamble and the file meta group's length.

    Returns:
        Where the file meta group ends (None unless its `(0002,0000)` group length comes first, as the
        standard asks), and whether the walk may read the header.
    """
    if size == 0:
        raise SliceError(path, Reason.EMPTY, "file is empty (0 bytes)")
    head = f.read(132)
    if len(head) < 132:
        raise SliceError(
            path, Reason.NOT_DICOM, f"file is {size:,} bytes, shorter than the 132-byte DICOM preamble"
        )
    if head[128:] != b"DICM":
        # What the file holds there is not shown: it may be anything (a served run's source is anyone's).
        raise SliceError(path, Reason.NOT_DICOM, "no DICOM preamble: b'DICM' expected at byte 128")
    if size < 144:
        raise SliceError(path, Reason.TRUNCATED, f"file ends inside the file meta group at {size:,} bytes")
    meta_end = None
    group_length = f.read(12)
    if len(group_length) == 12 and group_length[:6] == b"\x02\x00\x00\x00UL":
        meta_end = 144 + struct.unpack("<I", group_length[8:12])[0]
    if meta_end is not None and size < meta_end:
        raise SliceError(
            path,
            Reason.TRUNCATED,
            f"file ends inside the file meta group at {size:,} bytes, {meta_end:,} expected",
        )
    return meta_end, meta_end is not None and group_length[6:8] == b"\x04\x00"


def _dataset(
    path: str | os.PathLike[str], f: BinaryIO, size: int, meta_end: int | None, walkable: bool
) -> tuple[Header, Header, int]:
    """(file meta, dataset, offset where reading stopped): by the walk, or by pydicom."""
    walked = walk_header(f, size, meta_end) if walkable and meta_end is not None and _FAST_HEADER else None
    if walked is not None:
        return walked
    f.seek(0)
    try:
        ds = dcmread(f, stop_before_pixels=True)
    except (EOFError, struct.error) as e:
        raise SliceError(
            path, Reason.TRUNCATED, f"file ends inside the header at {size:,} bytes ({e})"
        ) from None
    except Exception as e:
        raise SliceError(path, Reason.NOT_DICOM, f"DICOM header cannot be parsed: {e}") from None
    return getattr(ds, "file_meta", None) or Dataset(), ds, f.tell()


def _transfer_syntax(path: str | os.PathLike[str], meta_ds: Header) -> UID:
    ts_text = text(meta_ds, tags.TRANSFER_SYNTAX)
    if ts_text is None:
        raise SliceError(path, Reason.NOT_DICOM, "no (0002,0010) Transfer Syntax UID in the file meta group")
    return UID(ts_text)


def _find_pixel_data(
    path: str | os.PathLike[str],
    f: BinaryIO,
    size: int,
    ts: UID,
    ds: Header,
    stop: int,
    meta_end: int | None,
) -> tuple[bool, bytes | None]:
    """Find where the pixel data starts; raise `SliceError` when the header is cut short.

    Returns:
        Whether reading stopped at the Pixel Data tag (rather than at the end of the file), and the
        pixel data itself when it had to be read with the header.

    A deflated dataset is one zlib stream: file offsets say nothing, so it is read whole, once, here.
    """
    if ts == DeflatedExplicitVRLittleEndian:
        f.seek(0)
        try:
            pixel_elem = dcmread(f).get_item(tags.PIXEL_DATA, keep_deferred=True)
        except Exception as e:
            raise SliceError(path, Reason.TRUNCATED, f"deflated dataset cannot be inflated: {e}") from None
        if pixel_elem is not None and pixel_elem.value is not None:
            return True, bytes(pixel_elem.value)
        return False, None
    if stop < size:
        f.seek(stop)
        tag_bytes = f.read(4)
        if len(tag_bytes) == 4:
            group, elem = struct.unpack("<HH" if ts != ExplicitVRBigEndian else ">HH", tag_bytes)
            if (group << 16 | elem) in tags.PIXEL_TAGS:
                return True, None
    end = last_element_end(ds) if len(ds) else meta_end
    if end is not None and end > size:
        raise SliceError(
            path, Reason.TRUNCATED, f"file ends inside the header at {size:,} bytes, {end:,} expected"
        )
    if end is not None and end < stop and stop == size:
        raise SliceError(
            path, Reason.TRUNCATED, f"file ends inside an element after byte {end:,} ({size:,} bytes)"
        )
    return False, None


def _check_image_kind(path: str | os.PathLike[str], meta_ds: Header, ds: Header) -> str:
    """Check that the file is a single-frame greyscale CT image; return its Photometric Interpretation."""
    sop_class = text(meta_ds, tags.MEDIA_SOP_CLASS) or text(ds, tags.SOP_CLASS)
    if sop_class == _DICOMDIR_SOP_CLASS:
        raise SliceError(path, Reason.NOT_IMAGE, "a DICOMDIR (media directory), not an image")
    modality = text(ds, tags.MODALITY)
    if modality != "CT":
        found = "missing" if modality is None else repr(modality)
        raise SliceError(
            path, Reason.NOT_CT, f"{describe(tags.MODALITY, 'Modality')} is {found}, 'CT' expected"
        )
    samples = uint(ds, tags.SAMPLES_PER_PIXEL)
    if samples is not None and samples != 1:
        raise SliceError(
            path,
            Reason.COLOUR,
            f"{describe(tags.SAMPLES_PER_PIXEL, 'Samples per Pixel')} is {samples}, 1 expected",
        )
    photometric = (text(ds, tags.PHOTOMETRIC) or "MONOCHROME2").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SliceError(
            path,
            Reason.COLOUR,
            f"{describe(tags.PHOTOMETRIC, 'Photometric Interpretation')} is {photometric!r}, "
            "MONOCHROME1 or MONOCHROME2 expected",
        )
    image_type = [v.upper() for v in (values(ds, tags.IMAGE_TYPE) or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        raise SliceError(
            path,
            Reason.LOCALIZER,
            f"{describe(tags.IMAGE_TYPE, 'Image Type')} is {joined(image_type)}: a localizer/scout",
        )
    frames = integer(ds, tags.NUMBER_OF_FRAMES)
    if frames is not None and frames > 1:
        raise SliceError(
            path,
            Reason.MULTI_FRAME,
            f"{describe(tags.NUMBER_OF_FRAMES, 'Number of Frames')} is {frames}, 1 expected",
        )
    return photometric


def _geometry(path: str | os.PathLike[str], ds: Header) -> tuple[float, tuple[float, float]]:
    """(position along the slice normal, (row, column) pixel spacing), checked."""
    position = require_floats(path, ds, tags.IMAGE_POSITION, "Image Position (Patient)", 3)
    orientation = require_floats(path, ds, tags.IMAGE_ORIENTATION, "Image Orientation (Patient)", 6)
    spacing = require_floats(path, ds, tags.PIXEL_SPACING, "Pixel Spacing", 2)
    try:
        position_along_normal = slice_position(position, orientation)
    except ValueError as e:
        detail = f"{describe(tags.IMAGE_ORIENTATION, 'Image Orientation (Patient)')}: {e}"
        raise SliceError(path, Reason.MISSING_GEOMETRY, detail) from None
    if min(spacing) <= 0:
        raise SliceError(
            path,
            Reason.MISSING_GEOMETRY,
            f"{describe(tags.PIXEL_SPACING, 'Pixel Spacing')} is {spacing[0]:g}\\{spacing[1]:g}, positive expected",
        )
    return position_along_normal, (spacing[0], spacing[1])


def _check_decoder(path: str | os.PathLike[str], ts: UID) -> None:
    """Native pixel data, or compressed with a decoder installed."""
    if ts in _NATIVE:
        return
    if not ts.is_transfer_syntax:
        raise SliceError(
            path,
            Reason.UNSUPPORTED_TRANSFER_SYNTAX,
            f"(0002,0010) Transfer Syntax UID {ts} is not a known transfer syntax",
        )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise SliceError(
            path,
            Reason.UNSUPPORTED_TRANSFER_SYNTAX,
            f"transfer syntax {ts} ({ts.name}) has no pixel data decoder",
        ) from None
    if not decoder.is_available:
        raise SliceError(
            path,
            Reason.UNSUPPORTED_TRANSFER_SYNTAX,
            f"transfer syntax {ts} ({ts.name}): no decoder plugin installed "
            f"(missing: {', '.join(sorted(decoder.missing_dependencies)) or 'a plugin'})",
        )


def _pixel_format(path: str | os.PathLike[str], ds: Header) -> _PixelFormat:
    """Rows, Columns, Bits Allocated/Stored, signedness and the HU table's key, checked."""
    rows = require_positive(path, ds, tags.ROWS, "Rows")
    cols = require_positive(path, ds, tags.COLUMNS, "Columns")
    bits_allocated = require_positive(path, ds, tags.BITS_ALLOCATED, "Bits Allocated")
    bits_stored = uint(ds, tags.BITS_STORED)
    pixel_representation = uint(ds, tags.PIXEL_REPRESENTATION)
    if bits_allocated not in (8, 16, 32):
        raise SliceError(
            path,
            Reason.UNDECODABLE,
            f"{describe(tags.BITS_ALLOCATED, 'Bits Allocated')} is {bits_allocated}, 8, 16 or 32 expected",
        )
    bits_stored = bits_stored or bits_allocated
    if bits_stored > bits_allocated:
        raise SliceError(
            path,
            Reason.UNDECODABLE,
            f"{describe(tags.BITS_STORED, 'Bits Stored')} is {bits_stored}, more than Bits Allocated {bits_allocated}",
        )
    signed = pixel_representation == 1
    intercept_values = floats(ds, tags.RESCALE_INTERCEPT)
    slope_values = floats(ds, tags.RESCALE_SLOPE)
    intercept = intercept_values[0] if intercept_values else 0.0
    slope = slope_values[0] if slope_values else 1.0
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise SliceError(
            path,
            Reason.UNDECODABLE,
            f"(0028,1053) Rescale Slope {slope:g} / (0028,1052) Rescale Intercept {intercept:g}: finite, non-zero slope expected",
        )
    key = HuKey(
        bits_allocated,
        bits_stored,
        signed,
        slope,
        intercept,
        rsna_12bit_applies(bits_stored, signed, intercept),
    )
    return _PixelFormat(rows, cols, bits_allocated, bits_stored, signed, key)


def _pixel_extent(
    path: str | os.PathLike[str],
    f: BinaryIO,
    size: int,
    ts: UID,
    stop: int,
    inline: bytes | None,
    fmt: _PixelFormat,
) -> tuple[int, int]:
    """Check the pixel data: present, complete, and (uncompressed) of the size the header declares.

    Returns:
        The file offset of the pixel data's value (-1 for `inline` data) and the bytes to read there.
    """
    rows, cols, bits_allocated = fmt.rows, fmt.cols, fmt.bits_allocated
    expected = rows * cols * bits_allocated // 8
    if inline is not None:
        length, value_offset = len(inline), -1
    else:
        length, value_offset = _pixel_element(path, f, stop, ts, size)
    check_side(path, rows, cols)
    if ts not in _NATIVE:
        if length != UNDEFINED_LENGTH:
            raise SliceError(
                path,
                Reason.UNDECODABLE,
                f"compressed pixel data ({ts.name}) is not encapsulated (length {length:,})",
            )
        return value_offset, _scan_fragments(path, f, value_offset, size)
    if length == UNDEFINED_LENGTH:
        raise SliceError(
            path,
            Reason.UNDECODABLE,
            f"encapsulated pixel data in an uncompressed transfer syntax ({ts.name})",
        )
    if length < expected:
        raise SliceError(
            path,
            Reason.SIZE_MISMATCH,
            f"pixel data is {length:,} bytes, {expected:,} expected for {rows}×{cols}×{bits_allocated} bit",
        )
    if inline is None and value_offset + expected > size:
        raise SliceError(
            path,
            Reason.TRUNCATED,
            f"file ends at {size:,} bytes, inside the pixel data ({value_offset + expected:,} bytes expected)",
        )
    return value_offset, expected


def check_side(path: str | os.PathLike[str], rows: int, cols: int) -> None:
    """Raise `SliceError` (`size_mismatch`) when Rows or Columns exceed `MAX_SIDE`."""
    if rows > MAX_SIDE or cols > MAX_SIDE:
        raise SliceError(
            path,
            Reason.SIZE_MISMATCH,
            f"Rows×Columns {rows:,}×{cols:,} is larger than {MAX_SIDE:,}×{MAX_SIDE:,}, the largest CT slice "
            "read (set aside before its pixel data is read)",
        )


def _pixel_element(
    path: str | os.PathLike[str], f: BinaryIO, stop: int, ts: UID, size: int
) -> tuple[int, int]:
    """Read the Pixel Data element header at `stop`: (value length, file offset of the value)."""
    f.seek(stop)
    big_endian = ts == ExplicitVRBigEndian
    implicit = ts == ImplicitVRLittleEndian
    order = ">" if big_endian else "<"
    header = f.read(8 if implicit else 12)
    if len(header) < 8:
        raise SliceError(
            path, Reason.TRUNCATED, f"file ends inside the Pixel Data element header at {size:,} bytes"
        )
    group, elem = struct.unpack(order + "HH", header[:4])
    if (group << 16 | elem) != tags.PIXEL_DATA:
        raise SliceError(
            path,
            Reason.NO_PIXEL_DATA,
            f"({group:04X},{elem:04X}) float pixel data, not (7FE0,0010) Pixel Data",
        )
    if implicit:
        return struct.unpack(order + "I", header[4:8])[0], stop + 8
    if header[4:6] in (b"OB", b"OW", b"UN", b"OV", b"OF", b"OD", b"OL"):
        if len(header) < 12:
            raise SliceError(
                path, Reason.TRUNCATED, f"file ends inside the Pixel Data element header at {size:,} bytes"
            )
        return struct.unpack(order + "I", header[8:12])[0], stop + 12
    return struct.unpack(order + "H", header[6:8])[0], stop + 8


def _scan_fragments(path: str | os.PathLike[str], f: BinaryIO, offset: int, size: int) -> int:
    """The length of encapsulated pixel data at `offset`, up to and including its sequence delimiter.

    Reads only the 8-byte item headers.
    """
    pos = offset
    n_items = 0
    while True:
        f.seek(pos)
        item = f.read(8)
        if len(item) < 8:
            raise SliceError(
                path, Reason.TRUNCATED, f"file ends at {size:,} bytes, inside the compressed pixel data"
            )
        group, elem, length = struct.unpack("<HHI", item)
        tag = group << 16 | elem
        if tag == tags.SEQUENCE_DELIMITER:
            break
        if tag != tags.ITEM or length == UNDEFINED_LENGTH:
            raise SliceError(
                path, Reason.UNDECODABLE, f"unexpected ({group:04X},{elem:04X}) in the compressed pixel data"
            )
        pos += 8 + length
        if pos > size:
            raise SliceError(
                path,
                Reason.TRUNCATED,
                f"file ends at {size:,} bytes, inside the compressed pixel data ({pos:,} expected)",
            )
        n_items += 1
    if n_items < 2:  # the basic offset table item, then at least one fragment
        raise SliceError(path, Reason.NO_PIXEL_DATA, "compressed pixel data holds no frame")
    return pos + 8 - offset
