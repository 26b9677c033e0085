"""What the reader returns: a slice's header facts (`SliceMeta`), or why it is not a slice (`SliceError`).

`PixelLayout` is the package's own record of where a slice's pixel data lies and how it is encoded;
`layout.py` turns it into the text the conversion's scan keeps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pydicom.uid import UID

from ichdata.dicom.hu import HuKey
from ichdata.reasons import SLICE_ERROR_REASONS, Reason

__all__ = ["PixelLayout", "SliceError", "SliceMeta"]


class SliceError(Exception):
    """A file that is not a usable CT slice: `reason` is one of `READER_REASONS`, `detail` says why.

    Or `changed_during_conversion`: the file is not the one an earlier scan read (`FileIdentity`).

    `str(e)` is `"<file name>: <detail>"`, e.g.
    `ID_6431af929.dcm: pixel data is 261,684 bytes, 524,288 expected for 512×512×16 bit`.
    """

    def __init__(self, path: str | os.PathLike[str], reason: Reason | str, detail: str) -> None:
        if reason not in SLICE_ERROR_REASONS:
            expected = ", ".join(SLICE_ERROR_REASONS)
            raise ValueError(f"unknown reason {str(reason)!r}; expected one of {expected}")
        self.path = os.fspath(path)
        self.reason = Reason(reason)
        self.detail = detail
        super().__init__(f"{os.path.basename(self.path)}: {detail}")

    def __reduce__(self) -> tuple[type[SliceError], tuple[str, Reason, str]]:
        # Dask and multiprocessing pickle exceptions; rebuild from the three fields.
        return (type(self), (self.path, self.reason, self.detail))


@dataclass(frozen=True)
class SliceMeta:
    """What the store and the ordering need from one slice's header, and nothing else."""

    image_id: str  # (0008,0018) SOP Instance UID (RSNA: the file stem, `ID_…`)
    study_uid: str  # (0020,000D) Study Instance UID
    series_uid: str  # (0020,000E) Series Instance UID
    patient_id: str  # (0010,0020) Patient ID ("" when absent)
    slice_position: float  # position along the slice normal, mm (see `ichdata.order.slice_position`)
    instance_number: int | None  # (0020,0013) Instance Number
    pixel_spacing: tuple[float, float]  # (0028,0030) Pixel Spacing: row spacing, column spacing, mm
    rows: int  # (0028,0010) Rows
    cols: int  # (0028,0011) Columns


@dataclass(frozen=True)
class PixelLayout:
    """How to get the stored values: where the pixel data lies and how it is encoded."""

    transfer_syntax: UID
    encapsulated: bool
    big_endian: bool
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    value_offset: int  # file offset of the Pixel Data value (-1 when unknown: deflated)
    value_length: int  # bytes to read from value_offset (native: the expected size)
    hu_key: HuKey  # the code → HU table
    inline: bytes | None = None  # the pixel data itself, when it was read with the header (deflated)
    element_offset: int = -1  # file offset of the (7FE0,0010) Pixel Data element's tag
    file_size: int = -1  # the file's size when the header was read
