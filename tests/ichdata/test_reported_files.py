"""Files that are stored but must be reported, and copies that disagree (issue 11 items 6 and 7).

Two slices at one position in a series are both kept and flagged (`duplicate_position`); a second file
with a stored image id and other pixel data is a `conflicting_duplicate`, an exact copy a `duplicate`;
a stored file edited afterwards is reported on the next run (`changed_since_conversion`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ichdata.config import ConvertConfig
from ichdata.convert import convert
from ichdata.reasons import KEPT_REASONS
from ichdata.store import open_store
from ichdata.testing import stored_from_hu, write_ct_slice
from ichdata.verify import verify_store


def _convert(src: Path, store: Path, **kw: object):
    return convert(ConvertConfig(src, store, shard_size=4, **kw), progress=False, client=None)  # type: ignore[arg-type]


def test_same_position_and_conflicting_duplicates_are_reported(tmp_path, convert_inputs) -> None:
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    axial = convert_inputs.write_case(src, "axial", rng, n=3)
    tilted = convert_inputs.write_case(src, "tilted", rng, n=3)
    first = min(axial, key=lambda w: w.position)
    assert convert_inputs.write_same_position(src, first) == "axial/zz_same_position"
    # The image id of a tilted slice, with other pixel data; and an exact copy of another.
    write_ct_slice(
        src / "zz_conflict.dcm",
        stored_from_hu(np.full((64, 64), 40.0)),
        image_id=tilted[0].image_id,
        study_uid=tilted[0].study_uid,
        series_uid=tilted[0].series_uid,
        patient_id="MRN-9",
        image_position=(0.0, 0.0, 500.0),
    )
    shutil.copy(src / tilted[1].path, src / "zz_copy.dcm")
    store = tmp_path / "s.zarr"
    summary = _convert(src, store)
    s = open_store(store)
    q = s.quarantine.set_index("path")
    assert q.at["axial/zz_same_position", "reason"] == "duplicate_position"
    assert q.at["axial/zz_same_position", "detail"] == (
        f"same slice position {10 + first.position:g} as {first.path} in series {first.series_uid}; both are stored"
    )
    assert q.at["zz_conflict.dcm", "reason"] == "conflicting_duplicate"
    assert q.at["zz_conflict.dcm", "detail"].startswith(
        f"image id {tilted[0].image_id} is already stored from {tilted[0].path}, with other pixel data"
    )
    assert q.at["zz_copy.dcm", "reason"] == "duplicate"
    # Both slices at one position are stored; the conflicting file and the copy are not.
    assert s.n_slices == 7
    assert {"axial/zz_same_position", first.path} <= set(s.source_path)
    assert summary.quarantined == {"conflicting_duplicate": 1, "duplicate": 1, "duplicate_position": 1}
    assert summary.n_files == 9  # every input file once
    report = verify_store(store)
    assert report.ok, str(report)
    again = _convert(src, store)
    assert again.quarantined == {}
    assert open_store(store).quarantine.equals(s.quarantine)


def test_a_stored_file_edited_afterwards_is_reported_on_the_next_run(tmp_path, convert_inputs) -> None:
    src = tmp_path / "src"
    written = convert_inputs.write_case(src, "axial", np.random.default_rng(8), n=3)
    store = tmp_path / "s.zarr"
    _convert(src, store)
    before = np.asarray(open_store(store).images[:3])
    edited = src / written[1].path
    st = edited.stat()
    edited.write_bytes(edited.read_bytes() + b"\0\0")  # edited in place: size and time change
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = _convert(src, store)
    assert second.quarantined == {"changed_since_conversion": 1}
    assert second.n_new == 0
    s = open_store(store)
    q = s.quarantine.set_index("path")
    detail = q.at[written[1].path, "detail"]
    assert q.at[written[1].path, "reason"] == "changed_since_conversion"
    assert f"{st.st_size:,} → {st.st_size + 2:,} bytes" in detail
    assert "--overwrite" in detail
    assert np.array_equal(np.asarray(s.images[:3]), before)  # the store keeps what it converted
    assert set(q["reason"]) <= set(KEPT_REASONS)
    report = verify_store(store)
    assert report.ok, str(report)
    third = _convert(src, store)  # reported once, kept in the quarantine
    assert third.quarantined == {}
    assert open_store(store).quarantine.equals(s.quarantine)
    _convert(src, store, overwrite=True)  # re-converted: nothing to report
    assert len(open_store(store).quarantine) == 0
