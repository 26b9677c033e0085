"""The header-only scan: every file under the source once, recognised by content, in parallel batches."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ichdata import scan as scan_mod
from ichdata.errors import UserError
from ichdata.scan import Manifest, scan, walk


@pytest.fixture
def tree(tmp_path, convert_inputs):
    rng = np.random.default_rng(5)
    root = tmp_path / "src"
    written = convert_inputs.write_case(root, "axial", rng, n=4)
    written += convert_inputs.write_case(root / "deep" / "er", "coronal", rng, n=3)
    (root / "README").write_text("an export note")
    (root / ".hidden").write_bytes(b"\0" * 10)
    os.symlink(root / written[0].path, root / "link_to_slice")
    os.symlink(root / "deep", root / "loop")  # a link to a folder is not followed
    return root, written


def test_walk_lists_every_file_once_recursively(tree) -> None:
    root, written = tree
    files = walk(root).files
    assert files == sorted(files)
    expected = {w.path for w in written[:4]} | {"deep/er/" + w.path for w in written[4:]}
    assert set(files) == expected | {"README", ".hidden", "link_to_slice"}
    assert len(files) == len(written) + 3
    assert "README" in files
    assert ".hidden" in files
    assert "link_to_slice" in files
    assert not any(f.startswith("loop/") for f in files)
    assert [(p, r) for p, r, _ in walk(root).odd] == [("loop", "not_a_file")]  # reported, not followed
    assert walk(root, exclude=[root / "deep"]).files == [f for f in files if not f.startswith("deep/")]


def test_scan_reads_headers_and_reasons(tree) -> None:
    root, written = tree
    m = scan(root)
    t = m.table.set_index("path")
    assert len(m) == len(written) + 4
    assert m.n_slices == len(written) + 1
    assert t.at["README", "reason"] == "not_dicom"
    assert t.at["loop", "reason"] == "not_a_file"  # the link to a folder
    assert t.at[".hidden", "reason"] == "not_dicom"
    w = written[0]
    assert t.at[w.path, "image_id"] == w.image_id
    assert t.at[w.path, "series_uid"] == w.series_uid
    assert t.at[w.path, "size"] == (root / w.path).stat().st_size
    assert m.reasons() == {"not_a_file": 1, "not_dicom": 2}


def test_parallel_batches_equal_the_serial_scan(tree) -> None:
    from distributed import Client, LocalCluster

    root, _ = tree
    serial = scan(root)
    seen: list[int] = []
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=False,
            dashboard_address=None,
            # The scheduler's HTTP endpoint listens even without a dashboard (default 8787, a UserWarning
            # when taken): a free loopback port instead.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        ) as c,
        Client(c) as client,
    ):
        par = scan(root, client, batch_size=3, on_progress=seen.append)
    assert sum(seen) == len(serial)
    assert len(seen) == -(-(len(serial) - 1) // 3) + 1  # the link to a folder: one update of its own
    assert par.table.drop(columns="mtime_ns").equals(serial.table.drop(columns="mtime_ns"))


def test_rescan_reads_only_new_or_changed_files(tree, tmp_path, monkeypatch) -> None:
    root, _written = tree
    first = scan(root)
    path = tmp_path / "m.parquet"
    first.write(path)
    prev = Manifest.read(path, root)
    assert "patient_id" not in __import__("pandas").read_parquet(path).columns  # never written
    calls: list[str] = []
    real = scan_mod.scan_files

    def counting(r, paths):
        calls.extend(paths)
        return real(r, paths)

    monkeypatch.setattr(scan_mod, "scan_files", counting)
    (root / "new_file").write_text("x")
    os.utime(root / "README", ns=(1, 1))
    again = scan(root, previous=prev)
    assert sorted(calls) == ["README", "new_file"]
    assert len(again) == len(first) + 1


def test_missing_source_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        scan(tmp_path / "nope")


def test_scan_batches_cover_every_file_in_order_and_share_evenly_between_workers() -> None:
    from ichdata.scan import MAX_BATCH, _batches

    for n, workers in ((4_053, 2), (4_053, 1), (12_072, 2), (752_803, 16), (100, 2), (0, 3)):
        paths = [f"f{i:07d}" for i in range(n)]
        batches = _batches(paths, workers, None)
        assert [p for b in batches for p in b] == paths
        assert all(len(b) <= max(MAX_BATCH, 64) for b in batches)
        if n >= 64 * 2 * workers:  # enough files for every worker to get batches of its own
            assert len(batches) % workers == 0
            assert len(batches) >= 2 * workers
            assert max(map(len, batches)) - min(map(len, batches)) <= len(batches)
    assert [len(b) for b in _batches([str(i) for i in range(10)], 2, 4)] == [4, 4, 2]


def test_a_scan_larger_than_the_large_graph_threshold_warns_nothing(tmp_path, dask_scheduler) -> None:
    # distributed warns ("Sending large graph") on the user's terminal when one submission carries more
    # than its threshold: here the batches' paths together exceed it, each batch alone does not.
    import warnings

    import dask
    from distributed import Client

    root = tmp_path / "src"
    root.mkdir()
    names = [f"{i:04d}_" + "n" * 200 for i in range(400)]
    for name in names:
        (root / name).write_bytes(b"not DICOM")
    with (
        dask.config.set({"distributed.admin.large-graph-warning-threshold": "40kB"}),
        Client(dask_scheduler) as client,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        m = scan(root, client, batch_size=40)
    assert [str(w.message) for w in caught] == []
    assert m.table["path"].tolist() == names
    assert m.reasons() == {"not_dicom": 400}


def test_is_in_answers_as_pandas_isin_for_arrow_and_object_strings() -> None:
    import pandas as pd

    from ichdata.scan import is_in

    values = ["a/1.dcm", None, "b/2.dcm", "a/1.dcm", "c"]
    cases: tuple[tuple[list[str | None], list[bool]], ...] = (
        (["a/1.dcm", "c"], [True, False, False, True, True]),
        (["a/1.dcm", None], [True, True, False, True, False]),  # a missing value matches a missing one
        ([], [False] * 5),
        (["zz"], [False] * 5),
    )
    for among, expected in cases:
        for dtype in (object, "str"):  # as the scan builds them, and as a Parquet manifest reads back
            v = pd.Series(values, dtype=dtype)
            a = pd.Series(among, dtype=dtype)
            assert is_in(v, a).tolist() == expected
            assert is_in(v, among).tolist() == expected
            assert v.isin(a).tolist() == expected  # the reference
    assert is_in([], ["a"]).tolist() == []


def test_a_scan_while_the_cluster_starts_equals_the_serial_scan(tree, dask_scheduler) -> None:
    """The driver reads the first files itself while the cluster starts; the cluster reads the rest.

    The cluster's start is held until the driver has read two runs of files, and the driver is held
    until the cluster is up: both parts are non-empty, and together they are the serial scan.
    """
    import contextlib
    import threading
    import time

    from distributed import Client

    from ichdata.cluster import SMALL_JOB, OnDemandClient

    root, _ = tree
    for i in range(SMALL_JOB + 200):
        (root / f"junk_{i:04d}").write_bytes(b"not DICOM")
    serial = scan(root)
    driver_read = threading.Event()
    read_before_up: list[int] = []
    progress: list[int] = []

    @contextlib.contextmanager
    def slow_start():
        assert driver_read.wait(60)
        with Client(dask_scheduler) as client:
            read_before_up.append(sum(progress))
            yield client

    def on_progress(n: int) -> None:
        progress.append(n)
        if sum(progress) >= 2 * scan_mod._WHILE_STARTING and not driver_read.is_set():
            driver_read.set()
            deadline = time.monotonic() + 60
            while not runner.ready and time.monotonic() < deadline:
                time.sleep(0.01)

    with contextlib.ExitStack() as stack:
        runner = OnDemandClient(slow_start, stack, small_job=SMALL_JOB, background=True)
        overlapped = scan(root, runner, on_progress=on_progress)
    assert 0 < read_before_up[0] < len(serial) - 1
    assert sum(progress) == len(serial)
    assert overlapped.table.drop(columns="mtime_ns").equals(serial.table.drop(columns="mtime_ns"))
