"""Read one CT slice from a DICOM file: HU, the header facts the store needs, or the rendered windows.

The public readers are `read_header`, `read_slice`, `read_rendered` and `is_dicom` (`read.py`), and
the conversion's two-pass pair `read_header_layout` / `read_rendered_layout` (`layout.py`, which
recognises a file replaced between the two: `identity.py`). A file
that is not a usable slice raises `SliceError` with a reason from `ichdata.reasons.READER_REASONS`
and a message naming the file, the value found and what was expected. HU follow DESIGN.md
"Preprocessing" (`hu.py`); headers are read by the walk (`walk.py`) or pydicom, with identical
results, and checked in `header.py`; pixel data is decoded in `pixels.py`.
"""

from __future__ import annotations

from ichdata.dicom.identity import FileIdentity
from ichdata.dicom.layout import read_header_layout, read_rendered_layout
from ichdata.dicom.meta import SliceError, SliceMeta
from ichdata.dicom.read import is_dicom, read_header, read_rendered, read_slice

__all__ = [
    "FileIdentity",
    "SliceError",
    "SliceMeta",
    "is_dicom",
    "read_header",
    "read_header_layout",
    "read_rendered",
    "read_rendered_layout",
    "read_slice",
]
