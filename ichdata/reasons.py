"""Why an input file is not a row of `images`: the one vocabulary of the quarantine's `reason` column.

A `StrEnum`, so a reason is its own string in every table and CSV we write (`Reason.EMPTY == "empty"`).
The reader's reasons come first (`READER_REASONS`); the rest are decided by the scan, the plan or the
conversion. What each means for a user is in the README's store section.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """A set-aside reason; the value is what the quarantine stores."""

    # The reader's (ichdata.dicom): the file is not a usable CT slice.
    NOT_DICOM = "not_dicom"
    EMPTY = "empty"
    TRUNCATED = "truncated"
    NO_PIXEL_DATA = "no_pixel_data"
    SIZE_MISMATCH = "size_mismatch"
    NOT_CT = "not_ct"
    COLOUR = "colour"
    LOCALIZER = "localizer"
    MULTI_FRAME = "multi_frame"
    MISSING_GEOMETRY = "missing_geometry"
    UNDECODABLE = "undecodable"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    NOT_IMAGE = "not_image"  # a DICOM file that is no image at all (a DICOMDIR media directory)
    MISSING_UID = "missing_uid"  # no SOP Instance, Study or Series UID: the slice cannot be placed
    # The scan's: reading the file failed in a way the reader does not classify.
    READ_ERROR = "read_error"
    # The plan's.
    DUPLICATE = "duplicate"  # an image id seen before (in the store or earlier in this run)
    SERIES_IN_STORE = "series_in_store"  # a new file of a series the store already holds


#: The reasons `ichdata.dicom` raises `SliceError` with, in the order the reader checks them.
READER_REASONS: tuple[Reason, ...] = tuple(Reason)[: list(Reason).index(Reason.MISSING_UID) + 1]

__all__ = ["READER_REASONS", "Reason"]
