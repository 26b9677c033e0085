"""The commit of a conversion: a re-run that finds nothing new writes nothing; anything new is committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ichdata.convert import ConvertConfig, convert
from ichdata.store import manifest_path, open_store, quarantine_csv_path


def _mtimes(store: Path) -> dict[Path, int]:
    files = [p for p in store.rglob("*") if p.is_file()]
    return {p: p.stat().st_mtime_ns for p in [*files, manifest_path(store), quarantine_csv_path(store)]}


def test_a_rerun_with_nothing_new_writes_nothing(tmp_path, convert_inputs) -> None:
    root = tmp_path / "src"
    rng = np.random.default_rng(4)
    for case in ("axial", "coronal"):
        convert_inputs.write_case(root, case, rng, n=3)
    store = tmp_path / "s.zarr"
    first = convert(ConvertConfig(root, store, shard_size=2), progress=False, client=None)
    attrs = open_store(store).attrs
    before = _mtimes(store)
    again = convert(ConvertConfig(root, store), progress=False, client=None)
    assert (again.n_new, again.n_slices, again.n_series, again.n_studies) == (
        0,
        first.n_slices,
        first.n_series,
        first.n_studies,
    )
    assert again.quarantined == {}
    assert _mtimes(store) == before  # not the manifest, not one array, not the attributes
    assert open_store(store).attrs == attrs
    # Something new to account for, even a file that is set aside, is committed.
    (root / "notes.txt").write_text("x")
    third = convert(ConvertConfig(root, store), progress=False, client=None)
    assert third.quarantined == {"not_dicom": 1}
    assert _mtimes(store)[manifest_path(store)] != before[manifest_path(store)]
    assert list(open_store(store).quarantine["path"]) == ["notes.txt"]


def test_a_rerun_with_a_report_on_a_stored_file_writes_nothing(tmp_path, convert_inputs) -> None:
    """A report on a stored file (`duplicate_position`) is no file set aside: counted once, not redone."""
    from ichdata.testing import stored_from_hu, write_ct_slice

    root = tmp_path / "src"
    first = min(
        convert_inputs.write_case(root, "axial", np.random.default_rng(5), n=3), key=lambda w: w.position
    )
    write_ct_slice(
        root / "axial" / "zz_same_position",
        stored_from_hu(np.zeros((64, 64))),
        image_id="ID_same_position",
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        patient_id="MRN-0042",
        image_position=(-60.0, -60.0, 10.0 + first.position),
    )
    store = tmp_path / "s.zarr"
    summary = convert(ConvertConfig(root, store, shard_size=2), progress=False, client=None)
    assert summary.quarantined == {"duplicate_position": 1}
    assert (summary.n_slices, summary.n_files, summary.n_quarantined_total) == (4, 4, 0)
    before = _mtimes(store)
    again = convert(ConvertConfig(root, store), progress=False, client=None)
    assert (again.n_files, again.n_quarantined_total) == (4, 0)
    assert _mtimes(store) == before
