"""A file replaced between the scan and its shard task is set aside, never stored under the old header.

The race is made deterministic: the shard task is paused (a stand-in for `ichdata.shards.convert_shard`)
after the scan and the plan, the file is replaced there, and the task goes on.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import RLELossless

from ichdata.config import ConvertConfig
from ichdata.convert import convert_shards, plan_conversion, scan_source
from ichdata.dicom import FileIdentity, SliceError, read_header_layout, read_rendered, read_rendered_layout
from ichdata.finalize import ConvertSummary, finalize
from ichdata.scan import scan
from ichdata.store import manifest_path, open_store
from ichdata.testing import stored_from_hu, write_ct_slice
from ichdata.verify import verify_store


def _write(path: Path, seed: int = 0, **kwargs: Any) -> Path:
    hu = np.random.default_rng(seed).integers(-1000, 3000, (64, 80)).astype(np.float64)
    write_ct_slice(
        path,
        stored_from_hu(hu),
        image_id=kwargs.pop("image_id", path.stem),
        study_uid="ID_study1",
        series_uid="ID_series1",
        patient_id="ID_patient1",
        image_position=(-125.0, -125.0, 42.5),
        **kwargs,
    )
    return path


def _replace_keeping_size(path: Path, *, keep_mtime: bool) -> str:
    """Replace `path` (by rename, as a copy or an export does) with another valid slice of the same size.

    Another image, study and series (UIDs of the same lengths), other pixels where they are not
    compressed. With `keep_mtime` the
    new file also carries the old modification time: only its header bytes tell it apart. Returns
    the new image id.
    """
    st = path.stat()

    def other(uid: str) -> str:
        return uid[:-1] + ("8" if uid[-1] != "8" else "9")

    tmp = path.with_name(path.name + ".new")
    with pydicom.config.disable_value_validation():  # RSNA's `ID_…` UIDs are not valid UIDs, on purpose
        ds = pydicom.dcmread(path)
        new_id = other(str(ds.SOPInstanceUID))
        ds.SOPInstanceUID = new_id
        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(new_id)
        ds.StudyInstanceUID = other(str(ds.StudyInstanceUID))
        ds.SeriesInstanceUID = other(str(ds.SeriesInstanceUID))
        if not ds.file_meta.TransferSyntaxUID.is_compressed:  # (compressed: the same pixels, other UIDs)
            ds.PixelData = (np.frombuffer(ds.PixelData, dtype=np.int16)[::-1]).tobytes()
        ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    assert path.stat().st_size == st.st_size
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return new_id


# --- the reader, asked to check the file -------------------------------------------------------------


def test_the_scan_keeps_a_crc_of_the_header_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path / "ID_a.dcm")
    _, _, crc = read_header_layout(path)
    data = path.read_bytes()
    assert crc == zlib.crc32(data[: data.rindex(b"\xe0\x7f\x10\x00OW")])
    table = scan(tmp_path).table.set_index("path")
    assert table.at["ID_a.dcm", "header_crc32"] == crc


@pytest.mark.parametrize("transfer_syntax", [None, RLELossless], ids=["layout", "full-reader"])
@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new-mtime", "same-mtime"])
def test_a_replaced_file_is_refused_when_its_identity_is_given(
    tmp_path: Path, transfer_syntax: str | None, keep_mtime: bool
) -> None:
    kwargs: dict[str, Any] = {} if transfer_syntax is None else {"transfer_syntax": transfer_syntax}
    path = _write(tmp_path / "ID_a.dcm", **kwargs)
    _, layout, crc = read_header_layout(path)
    st = path.stat()
    expect = FileIdentity(st.st_size, st.st_mtime_ns, crc)
    before = read_rendered(path, 32)[0]
    assert np.array_equal(read_rendered_layout(path, layout, 32, expect=expect), before)
    _replace_keeping_size(path, keep_mtime=keep_mtime)
    with pytest.raises(SliceError) as e:
        read_rendered_layout(path, layout, 32, expect=expect)
    assert e.value.reason == "changed_during_conversion"
    assert str(e.value).startswith("ID_a.dcm: changed while it was converted")
    # Without an identity to check, the file is read as it is now (prediction, previews).
    now = read_rendered_layout(path, layout, 32)
    assert np.array_equal(now, read_rendered(path, 32)[0])
    assert transfer_syntax is not None or not np.array_equal(now, before)


def test_an_unknown_header_crc_checks_size_and_time(tmp_path: Path) -> None:
    """A manifest of an earlier release has no header CRC: its rows are checked by size and time alone."""
    path = _write(tmp_path / "ID_a.dcm")
    _, layout, _ = read_header_layout(path)
    st = path.stat()
    expected = read_rendered(path, 32)[0]
    unknown = FileIdentity(st.st_size, st.st_mtime_ns, None)
    assert np.array_equal(read_rendered_layout(path, layout, 32, expect=unknown), expected)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(SliceError, match=r"modified at .* after it was scanned"):
        read_rendered_layout(path, layout, 32, expect=unknown)


# --- the conversion ----------------------------------------------------------------------------------


def convert(config: ConvertConfig) -> ConvertSummary:
    """`ich convert`'s stages in this process (no cluster): a stand-in for a shard task reaches them."""
    manifest = scan_source(config)
    return finalize(convert_shards(plan_conversion(config, manifest)), config=config)


@pytest.fixture
def source(tmp_path: Path, convert_inputs: Any) -> Path:
    root = tmp_path / "src"
    rng = np.random.default_rng(3)
    convert_inputs.write_case(root, "axial", rng, n=3)
    convert_inputs.write_case(root, "coronal", rng, n=3)
    return root


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new-mtime", "same-mtime"])
def test_a_file_replaced_between_scan_and_render_is_set_aside_then_converted_by_a_rerun(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_mtime: bool
) -> None:
    import ichdata.shards

    victim = source / "axial" / "f01"
    with pydicom.config.disable_value_validation():
        old_id = str(pydicom.dcmread(victim, stop_before_pixels=True).SOPInstanceUID)
    real = ichdata.shards.convert_shard
    replaced: list[str] = []

    def paused_shard_task(store: str, index: int, *args: Any) -> Any:
        # The known point: after the scan and the plan, before the first pixel is read.
        if not replaced:
            replaced.append(_replace_keeping_size(victim, keep_mtime=keep_mtime))
        return real(store, index, *args)

    monkeypatch.setattr(ichdata.shards, "convert_shard", paused_shard_task)
    store = tmp_path / "s.zarr"
    config = ConvertConfig(source, store, shard_size=2)
    summary = convert(config)
    monkeypatch.undo()
    new_id = replaced[0]

    assert summary.quarantined == {"changed_during_conversion": 1}
    s = open_store(store)
    assert s.n_slices == 5
    assert old_id not in set(s.image_id)
    assert new_id not in set(s.image_id)
    q = s.quarantine.set_index("path")
    assert q.at["axial/f01", "reason"] == "changed_during_conversion"
    assert "run the conversion again" in q.at["axial/f01", "detail"]
    rep = verify_store(store)
    assert rep.ok, rep.problems

    again = convert(config)
    s = open_store(store)
    assert again.n_new == 1
    assert s.n_slices == 6
    assert new_id in set(s.image_id)
    assert old_id not in set(s.image_id)
    assert "axial/f01" not in set(s.quarantine["path"])
    row = list(s.image_id).index(new_id)
    assert s.source_path[row] == "axial/f01"
    assert s.series.iloc[-1]["n_slices"] == 1  # its own series, appended after the stored ones
    expected = read_rendered(victim, 256)[0]
    assert np.abs(np.asarray(s.images[row]).astype(int) - expected).max() == 0
    rep = verify_store(store)
    assert rep.ok, rep.problems


def test_a_manifest_of_an_earlier_release_is_reused_without_rereading(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, convert_inputs: Any
) -> None:
    """A manifest without `header_crc32`: unchanged files are not read again, new ones are converted."""
    import ichdata.dicom

    store = tmp_path / "s.zarr"
    config = ConvertConfig(source, store, shard_size=2)
    convert(config)
    mp = manifest_path(store)
    pd.read_parquet(mp).drop(columns=["header_crc32"]).to_parquet(mp, index=False)
    convert_inputs.write_case(source, "nonsquare", np.random.default_rng(4), n=2)
    real = ichdata.dicom.read_header_layout
    read: list[str] = []

    def counting(path: Any) -> Any:
        read.append(Path(path).relative_to(source).as_posix())
        return real(path)

    monkeypatch.setattr(ichdata.dicom, "read_header_layout", counting)
    summary = convert(config)
    assert sorted(read) == ["nonsquare/f00", "nonsquare/f01"]
    assert summary.n_new == 2
    assert open_store(store).n_slices == 8
    rep = verify_store(store)
    assert rep.ok, rep.problems
    table = pd.read_parquet(mp).set_index("path")
    assert table["header_crc32"].isna().sum() == 6  # unknown for the rows carried over
    assert table.loc[["nonsquare/f00", "nonsquare/f01"], "header_crc32"].notna().all()
