"""The commit of a conversion: a re-run that finds nothing new writes nothing; anything new is committed."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdata.config import ConvertConfig
from ichdata.convert import convert
from ichdata.labels import CLASSES
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
    root = tmp_path / "src"
    first = min(
        convert_inputs.write_case(root, "axial", np.random.default_rng(5), n=3), key=lambda w: w.position
    )
    convert_inputs.write_same_position(root, first)
    store = tmp_path / "s.zarr"
    summary = convert(ConvertConfig(root, store, shard_size=2), progress=False, client=None)
    assert summary.quarantined == {"duplicate_position": 1}
    assert (summary.n_slices, summary.n_files, summary.n_quarantined_total) == (4, 4, 0)
    before = _mtimes(store)
    again = convert(ConvertConfig(root, store), progress=False, client=None)
    assert (again.n_files, again.n_quarantined_total) == (4, 0)
    assert _mtimes(store) == before


def _label_csv(path: Path, image_ids: list[str]) -> Path:
    """An RSNA label CSV (`ID_<image>_<class>,Label`) with a row per class of each of `image_ids`."""
    rows = [(f"{iid}_{c}", 0) for iid in image_ids for c in CLASSES]
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(("n_matching", "warned"), [(0, True), (1, True), (2, False), (None, False)])
def test_the_summary_says_how_many_images_got_labels(
    tmp_path, convert_inputs, caplog: pytest.LogCaptureFixture, n_matching: int | None, warned: bool
) -> None:
    """Given a label CSV, "N of M images labelled"; a warning when under half matched (issue 11 item 14)."""
    root = tmp_path / "src"
    ids = [w.image_id for w in convert_inputs.write_case(root, "axial", np.random.default_rng(6), n=4)]
    csv = None
    if n_matching is not None:
        csv = _label_csv(tmp_path / "labels.csv", [*ids[:n_matching], "ID_not_in_this_archive"])
    with caplog.at_level(logging.WARNING, logger="ichdata.finalize"):
        summary = convert(ConvertConfig(root, tmp_path / "s.zarr", labels=csv), progress=False, client=None)
    assert summary.n_labelled == n_matching
    if n_matching is None:
        assert "labelled" not in str(summary)
    else:
        assert f"; {n_matching} of 4 images labelled; " in str(summary)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ichdata.finalize"]
    if warned:
        assert len(warnings) == 1
        assert warnings[0].startswith(f"{csv}: {n_matching} of 4 images labelled; the rest are stored as 255")
        assert "\n" not in warnings[0]
    else:
        assert warnings == []


@pytest.mark.slow
def test_ich_convert_warns_in_one_line_when_no_label_matches(tmp_path, convert_inputs) -> None:
    root = tmp_path / "src"
    convert_inputs.write_case(root, "axial", np.random.default_rng(7), n=2)
    csv = _label_csv(tmp_path / "labels.csv", ["ID_not_in_this_archive"])
    argv = [str(root), str(tmp_path / "s.zarr"), "--labels", str(csv), "--workers", "1", "--quiet"]
    code = "import sys; from flows.cli import main; sys.exit(main(['convert', *sys.argv[1:]]))"
    run = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    assert "; 0 of 2 images labelled; " in run.stdout
    assert [line for line in run.stderr.splitlines() if "labelled" in line] == [
        f"{csv}: 0 of 2 images labelled; the rest are stored as 255 (unlabelled): the CSV's ID column "
        "must name the images' SOP Instance UIDs (RSNA: ID_…, the file stem)"
    ]
    assert "Traceback" not in run.stderr
