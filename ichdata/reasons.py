"""Why an input file is not a row of `images`: the one vocabulary of the quarantine's `reason` column.

A `StrEnum`, so a reason is its own string in every table and CSV we write (`Reason.EMPTY == "empty"`).
The reader's reasons come first (`READER_REASONS`); the rest are decided by the scan, the plan or the
conversion's shard tasks. The quarantine also reports a few files that stay in the store (`KEPT_REASONS`). What each
means for a user is in the README's store section.
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
    # The scan's, for entries of the source tree that cannot be read as a file.
    UNREADABLE_PATH = (
        "unreadable_path"  # permission denied (or another OS error) listing a folder or opening a file
    )
    SYMLINK_LOOP = "symlink_loop"  # a symbolic link that leads back to itself
    PATH_TOO_LONG = "path_too_long"  # a path longer than the OS opens (PATH_MAX): a folder or file too deep
    DANGLING_SYMLINK = "dangling_symlink"  # a symbolic link to nothing
    NOT_A_FILE = "not_a_file"  # a FIFO, socket or device, or a symbolic link to a folder (not followed)
    # The plan's.
    DUPLICATE = "duplicate"  # an image id seen before (in the store or earlier in this run)
    SERIES_IN_STORE = "series_in_store"  # a new file of a series the store already holds
    CONFLICTING_DUPLICATE = "conflicting_duplicate"  # an image id seen before, with other pixel data
    # The shard task's: the file it was to render is not the one the scan read (size, modification
    # time or header bytes differ); the store keeps nothing of it and a re-run reads it again.
    CHANGED_DURING_CONVERSION = "changed_during_conversion"
    # The plan's reports on files that stay rows of `images` (`KEPT_REASONS`).
    DUPLICATE_POSITION = "duplicate_position"  # a second slice at the same position in its series
    CHANGED_SINCE_CONVERSION = (
        "changed_since_conversion"  # edited after it was stored; the store has the old one
    )


#: The reasons `ichdata.dicom` raises `SliceError` with, in the order the reader checks them.
READER_REASONS: tuple[Reason, ...] = tuple(Reason)[: list(Reason).index(Reason.MISSING_UID) + 1]

#: The reasons a `SliceError` may carry: the reader's, and the one it raises when asked to check that a
#: file is still the one an earlier scan read (`ichdata.dicom.FileIdentity`).
SLICE_ERROR_REASONS: tuple[Reason, ...] = (*READER_REASONS, Reason.CHANGED_DURING_CONVERSION)

#: The reasons of quarantine rows that report a file still stored (a row of `images`), not one set aside.
KEPT_REASONS: frozenset[Reason] = frozenset({Reason.DUPLICATE_POSITION, Reason.CHANGED_SINCE_CONVERSION})

__all__ = ["KEPT_REASONS", "READER_REASONS", "SLICE_ERROR_REASONS", "Reason"]
