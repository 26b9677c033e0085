"""The scan's pixel layout: `read_header_layout` + `read_rendered_layout` render as `read_rendered` does.

Without parsing the header again, and falling back to the full reader whenever the file is not what
the layout describes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from ichdata.dicom import SliceError, read_header, read_header_layout, read_rendered, read_rendered_layout
from ichdata.scan import scan
from ichdata.testing import stored_from_hu, write_ct_slice


def _no_full_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, `read_rendered_layout` must not fall back to the full reader."""
    import ichdata.dicom.layout

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the full reader ran: the layout was not used")

    monkeypatch.setattr(ichdata.dicom.layout, "read_rendered", fail)


def _write(path: Path, shape: tuple[int, int] = (64, 80), seed: int = 0, **kwargs: Any) -> Path:
    header = {
        k: kwargs[k] for k in ("slope", "intercept", "bits_stored", "pixel_representation") if k in kwargs
    }
    hu = np.random.default_rng(seed).integers(-1000, 3000, shape).astype(np.float64)
    write_ct_slice(
        path,
        kwargs.pop("stored", None) if "stored" in kwargs else stored_from_hu(hu, **header),
        image_id=path.stem,
        study_uid="ID_study1",
        series_uid="ID_series1",
        patient_id="ID_patient1",
        image_position=(-125.0, -125.0, 42.5),
        **kwargs,
    )
    return path


@pytest.mark.parametrize(
    ("shape", "size", "header"),
    [
        ((512, 512), 256, {}),
        ((512, 640), 256, {}),  # padded, a non-integer factor: the float path
        ((490, 638), 256, {"slope": 0.5, "intercept": -1024.0}),
        ((64, 80), 32, {"bits_stored": 12, "pixel_representation": 0, "intercept": 0.0}),  # RSNA 12-bit fix
        ((64, 80), 32, {"bits_stored": 12, "pixel_representation": 0, "intercept": -1024.0}),
        ((64, 80), 32, {"pixel_representation": 0, "slope": 2.0, "intercept": -3000.0}),
        ((768, 768), 256, {}),
        ((128, 128), 256, {}),  # upsampling
        ((768, 768), 64, {}),  # a factor too large for the packed sums
    ],
)
def test_layout_renders_exactly_what_read_rendered_does(
    tmp_path: Path, shape: tuple[int, int], size: int, header: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "ID_a.dcm", shape, **header)
    meta, layout, _ = read_header_layout(path)
    assert meta == read_header(path)
    assert layout.startswith("ichpx1;")
    expected, _ = read_rendered(path, size)
    _no_full_reader(monkeypatch)
    got = read_rendered_layout(path, layout, size)
    assert got.dtype == np.uint8
    assert got.shape == (3, size, size)
    assert np.array_equal(got, expected)
    out = np.full((3, size, size), 7, dtype=np.uint8)
    assert read_rendered_layout(path, layout, size, out=out) is out
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_layout_of_other_native_syntaxes(
    tmp_path: Path, transfer_syntax: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "ID_a.dcm", transfer_syntax=transfer_syntax)
    _, layout, _ = read_header_layout(path)
    assert layout != ""
    expected = read_rendered(path, 32)[0]
    _no_full_reader(monkeypatch)
    assert np.array_equal(read_rendered_layout(path, layout, 32), expected)


@pytest.mark.parametrize("transfer_syntax", [DeflatedExplicitVRLittleEndian, RLELossless])
def test_no_layout_where_only_the_full_reader_decodes(tmp_path: Path, transfer_syntax: str) -> None:
    path = _write(tmp_path / "ID_a.dcm", transfer_syntax=transfer_syntax)
    _, layout, _ = read_header_layout(path)
    assert layout == ""
    assert np.array_equal(read_rendered_layout(path, layout, 32), read_rendered(path, 32)[0])


def test_a_changed_file_is_read_in_full(tmp_path: Path) -> None:
    path = _write(tmp_path / "ID_a.dcm", seed=1)
    _, layout, _ = read_header_layout(path)
    st = path.stat()
    # Same size, same place, other pixels and another intercept: the layout's mtime no longer matches.
    _write(path, seed=2, intercept=-1000.0)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert path.stat().st_size == st.st_size
    assert np.array_equal(read_rendered_layout(path, layout, 32), read_rendered(path, 32)[0])
    # Cut short: the full reader's SliceError, not garbage.
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(SliceError) as e:
        read_rendered_layout(path, layout, 32)
    assert e.value.reason == "truncated"


def test_a_layout_pointing_elsewhere_is_not_trusted(tmp_path: Path) -> None:
    path = _write(tmp_path / "ID_a.dcm")
    _, layout, _ = read_header_layout(path)
    parts = layout.split(";")
    parts[3] = str(int(parts[3]) + 2)  # the Pixel Data tag is not at this offset
    parts[4] = str(int(parts[4]) + 2)
    moved = ";".join(parts)
    assert np.array_equal(read_rendered_layout(path, moved, 32), read_rendered(path, 32)[0])
    for bad in ("", "nonsense", "ichpx0;1;2", layout.replace("ichpx1", "ichpx9")):
        assert np.array_equal(read_rendered_layout(path, bad, 32), read_rendered(path, 32)[0])


def test_scan_keeps_the_layout_in_the_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "ID_a.dcm")
    _write(src / "ID_b.dcm", transfer_syntax=RLELossless)
    (src / "notes.txt").write_text("not DICOM")
    t = scan(src).table.set_index("path")
    assert t.at["ID_a.dcm", "pixel_layout"] == read_header_layout(src / "ID_a.dcm")[1]
    assert t.at["ID_b.dcm", "pixel_layout"] == ""
    assert pd.isna(t.at["notes.txt", "pixel_layout"])  # missing, as in a manifest read back


def test_without_preadv_the_layout_reads_with_seek(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ichdata.dicom.layout

    path = _write(tmp_path / "ID_a.dcm", (512, 512))
    _, layout, _ = read_header_layout(path)
    expected = read_rendered(path)[0]
    monkeypatch.setattr(ichdata.dicom.layout, "_HAS_PREADV", False)
    _no_full_reader(monkeypatch)
    assert np.array_equal(read_rendered_layout(path, layout), expected)


def test_a_layout_of_a_slice_over_the_size_cap_reads_no_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest from a scan without the cap hands the shard task a huge slice: set aside, no buffer."""
    import ichdata.dicom.header
    import ichdata.dicom.layout
    import ichdata.dicom.pixels

    path = _write(tmp_path / "ID_huge.dcm", extra={"Rows": 40000, "Columns": 40000})
    data = bytearray(path.read_bytes())
    pixel = data.rindex(b"\xe0\x7f\x10\x00OW")
    data[pixel + 8 : pixel + 12] = (40000 * 40000 * 2).to_bytes(4, "little")
    path.write_bytes(bytes(data[: pixel + 12]))
    with path.open("r+b") as f:
        f.truncate(pixel + 12 + 40000 * 40000 * 2)  # sparse: 3.2 GB declared, a few kB on disk
    monkeypatch.setattr(ichdata.dicom.header, "MAX_SIDE", 65535)  # the scan of an earlier release
    _, layout, _ = read_header_layout(path)
    assert layout.startswith("ichpx1;")
    monkeypatch.undo()

    def small_buffers_only(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        assert int(np.prod(shape)) * np.dtype(dtype).itemsize <= 64 << 20, f"a {shape} buffer"
        return np.empty(shape, dtype)

    monkeypatch.setattr(ichdata.dicom.layout, "_scratch", small_buffers_only)
    monkeypatch.setattr(ichdata.dicom.pixels, "_scratch", small_buffers_only)
    with pytest.raises(SliceError) as e:
        read_rendered_layout(path, layout, 32)
    assert e.value.reason == "size_mismatch"
    assert "40,000×40,000 is larger than 4,096×4,096" in e.value.detail
