"""Is this still the file the scan read? Its size, modification time and a CRC-32 of its header bytes.

The conversion reads each file twice, minutes apart: the scan reads its header (what the store records
of it: image id, series, position, label), a shard task later reads its pixels. A file replaced in
between must not be rendered under the first file's header facts. The scan keeps a `FileIdentity` of
every file in the manifest; the shard task hands it to the reader (`read_rendered_layout(expect=…)`),
which compares it with what it reads anyway and raises `SliceError` `changed_during_conversion`.
The header bytes are everything before the (7FE0,0010) Pixel Data tag: the facts the store records
live there, and they are a kB or two, read with the pixels in the same positioned read.
"""

from __future__ import annotations

import os
import zlib
from datetime import UTC, datetime
from typing import NamedTuple

from ichdata.dicom.meta import SliceError
from ichdata.reasons import Reason

__all__ = ["FileIdentity", "check_header", "check_stat", "header_crc32", "read_header_crc32"]


class FileIdentity(NamedTuple):
    """What the scan saw of a file; None where it is unknown (a manifest of an earlier release)."""

    size: int | None
    mtime_ns: int | None
    header_crc32: int | None  # CRC-32 of the bytes before the Pixel Data tag


def header_crc32(data: bytes | memoryview) -> int:
    """The CRC-32 of a file's header bytes (a checksum against accidents, not an adversary)."""
    return zlib.crc32(data)


def read_header_crc32(fd: int, element_offset: int) -> int | None:
    """`header_crc32` of the first `element_offset` bytes of the open file `fd` (None when unknown: -1)."""
    if element_offset < 0:
        return None
    return header_crc32(os.pread(fd, element_offset, 0))


def _changed(path: str | os.PathLike[str], what: str) -> SliceError:
    return SliceError(
        path,
        Reason.CHANGED_DURING_CONVERSION,
        f"changed while it was converted ({what}): set aside rather than stored under what the scan read; "
        "run the conversion again to convert the new version",
    )


def check_stat(path: str | os.PathLike[str], expect: FileIdentity, st: os.stat_result) -> None:
    """Raise `changed_during_conversion` when `st` (of the open file) differs from `expect` in size or time."""
    if expect.size is not None and st.st_size != expect.size:
        raise _changed(path, f"{expect.size:,} bytes when scanned, {st.st_size:,} now")
    if expect.mtime_ns is not None and st.st_mtime_ns != expect.mtime_ns:
        when = datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)
        raise _changed(path, f"modified at {when:%Y-%m-%d %H:%M:%S} UTC, after it was scanned")


def check_header(path: str | os.PathLike[str], expect: FileIdentity, crc: int | None) -> None:
    """Raise `changed_during_conversion` when the header's CRC-32 `crc` differs from the scan's."""
    if expect.header_crc32 is not None and crc is not None and crc != expect.header_crc32:
        raise _changed(path, "its header bytes differ from the ones scanned")
