"""The DICOM tags the reader looks at, as `(group << 16) | element` integers.

One table for the header walk (`walk.py`), the header checks (`header.py`) and the pixel data
(`header.py`, `layout.py`); a tag's name is its keyword in DICOM PS3.6.
"""

from __future__ import annotations

import struct

MEDIA_SOP_CLASS = 0x00020002  # (0002,0002) Media Storage SOP Class UID
TRANSFER_SYNTAX = 0x00020010  # (0002,0010) Transfer Syntax UID
SPECIFIC_CHARACTER_SET = 0x00080005
IMAGE_TYPE = 0x00080008
SOP_CLASS = 0x00080016
SOP_INSTANCE = 0x00080018
MODALITY = 0x00080060
PATIENT_ID = 0x00100020
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
INSTANCE_NUMBER = 0x00200013
IMAGE_POSITION = 0x00200032
IMAGE_ORIENTATION = 0x00200037
SAMPLES_PER_PIXEL = 0x00280002
PHOTOMETRIC = 0x00280004
NUMBER_OF_FRAMES = 0x00280008
ROWS = 0x00280010
COLUMNS = 0x00280011
PIXEL_SPACING = 0x00280030
BITS_ALLOCATED = 0x00280100
BITS_STORED = 0x00280101
PIXEL_REPRESENTATION = 0x00280103
RESCALE_INTERCEPT = 0x00281052
RESCALE_SLOPE = 0x00281053
PIXEL_DATA = 0x7FE00010
#: The tags pydicom's `stop_before_pixels` stops at: (7FE0,0008) Float, (7FE0,0009) Double Float and
#: (7FE0,0010) Pixel Data.
PIXEL_TAGS = frozenset({PIXEL_DATA, 0x7FE00008, 0x7FE00009})
ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF

U16_PAIR, U16, U32 = struct.Struct("<HH"), struct.Struct("<H"), struct.Struct("<I")


def describe(tag: int, keyword: str) -> str:
    """`(GGGG,EEEE) Keyword`, as error messages name an element."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"
