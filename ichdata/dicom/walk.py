"""The header walk: the common files' headers read without pydicom's dataset machinery.

`dcmread(stop_before_pixels=True)` builds a Dataset, a Tag and a RawDataElement for every element and
checks each against its stop callback: most of the scan's time per file. `walk_header` reads the same
bytes the same way for the files that make up nearly every archive (a well-formed file meta group;
Implicit or Explicit VR Little Endian datasets, compressed ones included; elements of defined length
up to the Pixel Data tag) and keeps only the elements the header checks look at, as the same raw
elements pydicom would hand them. Whatever it is not sure about (an undefined-length sequence, an
unknown VR, an element that runs past the end of the file, a file meta group whose length disagrees
with its elements, big-endian or deflated data) it leaves to pydicom by returning None, so results
and `SliceError`s are pydicom's by construction (`tests/ichdata/test_dicom.py` holds the paths equal).
"""

from __future__ import annotations

from typing import BinaryIO

from pydicom.charset import python_encoding
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.uid import AllTransferSyntaxes, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.valuerep import VR as _VR

from ichdata.dicom import tags
from ichdata.dicom.tags import (
    PIXEL_TAGS,
    SPECIFIC_CHARACTER_SET,
    TRANSFER_SYNTAX,
    U16,
    U16_PAIR,
    U32,
    UNDEFINED_LENGTH,
)

__all__ = ["Elements", "walk_header"]

#: The elements the header checks read; the walk keeps these and skips the rest.
WANTED = frozenset(
    {
        tags.MEDIA_SOP_CLASS,
        tags.TRANSFER_SYNTAX,
        tags.IMAGE_TYPE,
        tags.SOP_CLASS,
        tags.SOP_INSTANCE,
        tags.MODALITY,
        tags.PATIENT_ID,
        tags.STUDY_UID,
        tags.SERIES_UID,
        tags.INSTANCE_NUMBER,
        tags.IMAGE_POSITION,
        tags.IMAGE_ORIENTATION,
        tags.SAMPLES_PER_PIXEL,
        tags.PHOTOMETRIC,
        tags.NUMBER_OF_FRAMES,
        tags.ROWS,
        tags.COLUMNS,
        tags.PIXEL_SPACING,
        tags.BITS_ALLOCATED,
        tags.BITS_STORED,
        tags.PIXEL_REPRESENTATION,
        tags.RESCALE_INTERCEPT,
        tags.RESCALE_SLOPE,
    }
)
_VR_KNOWN = frozenset(v.value.encode() for v in _VR if len(v.value) == 2)
_VR_LONG = frozenset(v.encode() for v in EXPLICIT_VR_LENGTH_32)  # 2 reserved bytes, 4-byte length
_CHARSETS = frozenset({b"", *(term.encode() for term in python_encoding)})
# Transfer syntax UID (bytes) → whether pydicom reads the dataset as Explicit VR (True) or Implicit VR
# (False) Little Endian; absent: what the walk leaves to pydicom (big endian, deflated, unknown). Looked
# up, never `UID()` of unknown bytes: pydicom validates those, and warns.
_DATASET_EXPLICIT = {
    ts.encode(): not ts.is_implicit_VR
    for ts in AllTransferSyntaxes
    if ts.is_little_endian and ts != DeflatedExplicitVRLittleEndian
}
_HEADER_READ = 16384  # bytes per read while walking: a few times a typical CT header


class Elements(dict[int, RawDataElement]):
    """The raw elements the header checks read, by tag, with the one Dataset method they use."""

    def get_item(self, tag: int, keep_deferred: bool = True) -> RawDataElement | None:
        """The raw element of `tag`, or None (`Dataset.get_item`'s signature)."""
        return self.get(tag)


# One loop over the elements with its read-ahead buffer in a closure: split up, every element would
# pay for passing the buffer around, and this loop is the scan's cost per file.
def walk_header(f: BinaryIO, size: int, meta_end: int) -> tuple[Elements, Elements, int] | None:
    """Walk the header of the open file `f` (`size` bytes) as pydicom would with `stop_before_pixels`.

    Args:
        f: the file, positioned anywhere.
        size: its size in bytes.
        meta_end: where the file meta group ends, from its `(0002,0000)` group length.

    Returns:
        (file meta elements, dataset elements, offset of the Pixel Data tag), or None to let pydicom
        read the file.
    """
    unpack_tag, unpack_u16, unpack_u32 = U16_PAIR.unpack_from, U16.unpack_from, U32.unpack_from
    base, buf = 0, b""

    def window(pos: int, n: int) -> bool:
        """Make `buf` (which starts at file offset `base`) cover [pos, pos + n) when the file does."""
        nonlocal base, buf
        if base <= pos and pos + n <= base + len(buf):
            return True
        if pos + n > size:
            return False
        f.seek(pos)
        base, buf = pos, f.read(max(n, _HEADER_READ))
        return pos + n <= base + len(buf)

    meta, data = Elements(), Elements()
    pos, explicit, first = 132, True, True
    while True:
        if pos + 12 > base + len(buf) and not window(pos, 8):  # (the buffer never starts past pos)
            return None  # the file ends here or inside an element header: pydicom's messages
        at = pos - base
        group, elem = unpack_tag(buf, at)
        tag = group << 16 | elem
        in_meta = pos < meta_end
        if in_meta != (group == 2):
            return None  # the group length and the elements disagree; pydicom decides
        if not in_meta and first:
            first = False
            if pos != meta_end:
                return None  # the last file meta element runs past the group length
            if group == 0 or group == 0xFFFE:
                return None  # a command set or a delimiter first: pydicom's special cases
            ts = meta.get(TRANSFER_SYNTAX)
            if ts is None or not isinstance(ts.value, bytes):
                return None
            syntax = _DATASET_EXPLICIT.get(ts.value.rstrip(b"\x00 "))
            if syntax is None:
                return None
            explicit = syntax
            vr_bytes = buf[at + 4 : at + 6]
            if explicit != (0x40 < vr_bytes[0] < 0x5B and 0x40 < vr_bytes[1] < 0x5B):
                return None  # pydicom would switch between implicit and explicit VR, with a warning
        if group == 0xFFFE:
            return None  # items and delimiters outside a sequence
        vr: str | None
        if explicit:
            vr_bytes = buf[at + 4 : at + 6]
            if vr_bytes not in _VR_KNOWN:
                return None
            vr = vr_bytes.decode("ascii")
            if vr_bytes in _VR_LONG:
                if not window(pos, 12):
                    return None
                at = pos - base
                length = unpack_u32(buf, at + 8)[0]
                header = 12
            else:
                length = unpack_u16(buf, at + 6)[0]
                header = 8
        else:
            vr = None
            length = unpack_u32(buf, at + 4)[0]
            header = 8
        if not in_meta and tag in PIXEL_TAGS:
            return meta, data, pos  # pydicom stops here too, once it has read the element's header
        if length == UNDEFINED_LENGTH:
            return None  # a sequence or value of undefined length: pydicom parses it
        value_at = pos + header
        end = value_at + length
        if end > size:
            return None  # runs past the end of the file: pydicom's truncation messages
        if tag == SPECIFIC_CHARACTER_SET and not in_meta:
            # pydicom decodes this one while it reads and fails (or warns) on odd values: leave those to it
            if vr not in (None, "CS") or (end > base + len(buf) and not window(value_at, length)):
                return None
            terms = buf[value_at - base : end - base].split(b"\\")
            if not all(t.rstrip(b" \x00") in _CHARSETS for t in terms):
                return None
        if in_meta and vr != "UI" and tag in WANTED:
            return None  # pydicom converts these two by their VR: a UID of another VR is its business
        if tag in WANTED:
            if end > base + len(buf) and not window(value_at, length):
                return None
            value = buf[value_at - base : end - base] if length else b""
            (meta if in_meta else data)[tag] = RawDataElement(
                BaseTag(tag), vr, length, value, value_at, not explicit, True
            )
        pos = end
        if pos >= size:
            return None  # no Pixel Data: pydicom tells what is missing
