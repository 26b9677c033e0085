"""The conversion end to end.

Pixels against the tests' own reference, order, labels, every file accounted for, incremental appends,
pixel-time failures, and a real Dask cluster that loses a worker or its driver.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from flows.cli import main
from ichdata.config import ClusterConfig, ConvertConfig
from ichdata.convert import convert, convert_shards
from ichdata.finalize import finalize
from ichdata.plan import plan
from ichdata.reasons import READER_REASONS as REASONS
from ichdata.scan import scan
from ichdata.store import CLASSES, manifest_path, open_store, quarantine_csv_path, salt_path


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, convert_inputs) -> tuple[Path, list, dict[str, str]]:
    ci = convert_inputs
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(7)
    written = []
    for case in ci.CASES:
        written.extend(ci.write_case(root, case, rng))
    broken = ci.write_broken(root, rng, keep=written[0])
    return root, written, broken


def _labels_csv(path: Path, image_ids: list[str]) -> dict[str, np.ndarray]:
    """An RSNA label CSV for `image_ids` (deterministic labels); returns the expected rows."""
    rows: list[tuple[str, int]] = []
    expected: dict[str, np.ndarray] = {}
    for iid in image_ids:
        bits = np.array([(zlib.crc32(f"{iid}{c}".encode()) >> 3) & 1 for c in CLASSES[:-1]], dtype=np.uint8)
        lab = np.append(bits, np.uint8(bits.any()))
        expected[iid] = lab
        rows.extend((f"{iid}_{c}", int(v)) for c, v in zip(CLASSES, lab, strict=True))
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(path, index=False)
    return expected


@pytest.fixture(scope="module")
def converted(archive, tmp_path_factory):
    root, written, _broken = archive
    out = tmp_path_factory.mktemp("store")
    labelled = [w.image_id for w in written[::2]]
    csv = out / "labels.csv"
    expected = _labels_csv(csv, labelled)
    store = out / "ct.zarr"
    summary = convert(ConvertConfig(root, store, labels=csv, shard_size=4), progress=False, client=None)
    return store, summary, expected


def test_pixels_order_and_labels_match_the_reference(archive, converted) -> None:
    _, written, _ = archive
    store_path, _, expected_labels = converted
    s = open_store(store_path)
    row_of = {iid: r for r, iid in enumerate(s.image_id)}
    by_series: dict[str, list] = {}
    for w in written:
        by_series.setdefault(w.series_uid, []).append(w)
    for series_uid, ws in by_series.items():
        idx = int(np.flatnonzero(s.series["series_uid"].to_numpy() == series_uid)[0])
        a, b = s.series_rows(idx)
        ws = sorted(ws, key=lambda w: w.position)
        # Contiguous, in position order, whatever the file names or InstanceNumbers say.
        assert [row_of[w.image_id] for w in ws] == list(range(a, b)), series_uid
        got = s.read_series(idx)
        for k, w in enumerate(ws):
            diff = np.abs(got[k].astype(int) - w.expected.astype(int))
            assert diff.max() <= 1, (series_uid, w.path, int(diff.max()))
        assert np.all(np.diff(s.slice_position[a:b]) > 0)
        assert list(s.source_path[a:b]) == [w.path for w in ws]
    for iid, r in row_of.items():
        want = expected_labels.get(iid, np.full(6, 255, np.uint8))
        assert s.labels[r].tolist() == want.tolist(), iid


def test_every_input_file_is_stored_or_set_aside_with_its_reason(archive, converted) -> None:
    root, written, broken = archive
    store_path, summary, _ = converted
    s = open_store(store_path)
    q = s.quarantine.set_index("path")
    for reason, path in broken.items():
        assert q.at[path, "reason"] == reason, path
    assert set(REASONS) <= set(q["reason"]) | {"read_error"}  # every reason the reader knows
    assert (
        q.at[broken["duplicate"], "detail"]
        == f"image id {written[0].image_id} is already stored from {written[0].path}"
    )
    n_files = sum(len(files) for _, _, files in os.walk(root))
    assert s.n_slices + len(s.quarantine) == n_files
    # The DICOMDIR's two images are nested, extensionless, and stored.
    assert sum(p.startswith("export/PT000000/") for p in s.source_path) == 2
    assert s.n_slices == len(written) + 2
    assert summary.quarantined == s.quarantine["reason"].value_counts().to_dict()
    csv = pd.read_csv(quarantine_csv_path(store_path), keep_default_na=False)
    assert csv.to_dict("records") == s.quarantine.to_dict("records")
    assert str(summary).startswith(f"{store_path}: wrote {s.n_slices} slices")


def test_store_holds_no_phi_and_the_group_lists_quietly(converted) -> None:
    store_path, _, _ = converted
    blobs = [p.read_bytes() for p in store_path.rglob("*") if p.is_file()]
    blobs += [manifest_path(store_path).read_bytes(), quarantine_csv_path(store_path).read_bytes()]
    for phi in (b"Doe^Jane", b"MRN-0042", b"MRN-7781"):
        assert not any(phi in b for b in blobs), phi
    s = open_store(store_path)
    assert all(k.startswith("P") and len(k) == 17 for k in s.series["patient_key"] if not k.startswith("ID_"))
    assert salt_path(store_path).stat().st_mode & 0o077 == 0
    # zarr warns about non-Zarr files inside a group; warnings are errors here.
    names = sorted(n for n, _ in zarr.open_group(str(store_path), mode="r").members(max_depth=None))
    assert "images" in names
    assert "quarantine/reason" in names


def test_rerun_on_a_finished_store_changes_nothing(archive, converted, tmp_path) -> None:
    root, _, _ = archive
    store_path, _, _ = converted
    before = {p: p.stat().st_mtime_ns for p in (store_path / "images").rglob("*") if p.is_file()}
    again = convert(ConvertConfig(root, store_path), progress=False, client=None)
    assert again.n_new == 0
    assert again.quarantined == {}
    assert again.n_shards_written == 0
    after = {p: p.stat().st_mtime_ns for p in (store_path / "images").rglob("*") if p.is_file()}
    assert before == after


def _snapshot(store: Path) -> dict[str, np.ndarray]:
    s = open_store(store)
    return {
        "images": np.asarray(s.images[: s.n_slices]),
        "labels": s.labels,
        "image_id": s.image_id,
        "offsets": s.study_offsets,
        # Patient keys are salted per store: compare which series share a patient, not the keys.
        "series": s.series.drop(columns="patient_key").to_numpy(),
        "patients": pd.factorize(s.series["patient_key"])[0],
        "quarantine": s.quarantine.to_numpy(),
    }


def _sorted_by_image(store: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    s = open_store(store)
    order = np.argsort(s.image_id)
    return list(s.image_id[order]), np.asarray(s.images[: s.n_slices])[order], s.labels[order]


def test_incremental_append_equals_one_shot(tmp_path, convert_inputs) -> None:
    write_case = convert_inputs.write_case
    rng = np.random.default_rng(3)
    src = tmp_path / "landing"
    first = [w for case in ("axial", "tilted", "coronal") for w in write_case(src, case, rng, n=5)]
    csv = tmp_path / "labels.csv"
    store = tmp_path / "inc.zarr"
    s1 = convert(ConvertConfig(src, store, labels=None, shard_size=4), progress=False, client=None)
    assert s1.n_new == 15
    shard0 = (store / "images" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns
    (src / "notes.txt").write_text("x")
    later = [w for case in ("slope", "rsna_12bit") for w in write_case(src, case, rng, n=3)]
    # A late slice of a series already stored is reported, not spliced in.
    from ichdata.testing import stored_from_hu, write_ct_slice

    write_ct_slice(
        src / "axial" / "late",
        stored_from_hu(np.zeros((64, 64))),
        image_id="ID_late",
        study_uid=first[0].study_uid,
        series_uid=first[0].series_uid,
        patient_id="MRN-0042",
        image_position=(0, 0, 99.0),
    )
    expected = _labels_csv(csv, [w.image_id for w in first + later])
    s2 = convert(ConvertConfig(src, store, labels=csv), progress=False, client=None)
    assert s2.n_new == 6
    assert s2.quarantined == {"not_dicom": 1, "series_in_store": 1}
    assert (store / "images" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns == shard0  # untouched
    st = open_store(store)
    assert [st.labels[list(st.image_id).index(i)].tolist() for i in expected] == [
        v.tolist() for v in expected.values()
    ]
    # An append killed before it commits leaves the store readable as it was; the next run finishes it.
    more = write_case(src, "big768", rng, n=2)
    p = plan(scan(src, exclude=[csv]), store, labels=csv)
    convert_shards(p, None)  # ... and the driver dies here, before finalize
    st = open_store(store)
    assert st.n_slices == 21
    assert st.images.shape[0] == 23
    assert more[0].image_id not in set(st.image_id)
    s3 = convert(ConvertConfig(src, store, labels=csv), progress=False, client=None)
    assert s3.n_new == 2
    assert s3.n_shards_written == 0  # the killed run had written them
    # A third run reports nothing new.
    s3 = convert(ConvertConfig(src, store, labels=csv), progress=False, client=None)
    assert s3.n_new == 0
    assert s3.quarantined == {}
    assert s3.n_shards_written == 0
    # Same slices, labels and set-aside files as converting everything at once.
    one = tmp_path / "one.zarr"
    convert(ConvertConfig(src, one, labels=csv, shard_size=4), progress=False, client=None)
    ids_a, img_a, lab_a = _sorted_by_image(store)
    ids_b, img_b, lab_b = _sorted_by_image(one)
    assert set(ids_b) - set(ids_a) == {"ID_late"}
    assert set(ids_a) <= set(ids_b)
    keep = [ids_b.index(i) for i in ids_a]
    assert np.array_equal(img_a, img_b[keep])
    assert np.array_equal(lab_a, lab_b[keep])


@pytest.fixture(scope="module")
def threads_client(dask_scheduler: str):
    """A client of the suite's in-process cluster (one worker of two threads).

    Tasks of several shards, quickly.
    """
    from distributed import Client

    with Client(dask_scheduler) as client:
        yield client


@pytest.mark.parametrize("on_cluster", [False, True], ids=["in-process", "cluster"])
def test_pixel_time_failure_is_quarantined_without_a_hole(archive, tmp_path, request, on_cluster) -> None:
    root, written, broken = archive
    client = request.getfixturevalue("threads_client") if on_cluster else None
    m = scan(root, client)
    # The scan cannot see it: the header is fine.
    assert m.table.set_index("path").at[broken["undecodable"], "reason"] == ""
    p = plan(m, tmp_path / "s.zarr", shard_size=2)
    result = convert_shards(p, client)
    assert result.pixel_failures["path"].tolist() == [broken["undecodable"]]
    summary = finalize(result)
    s = open_store(tmp_path / "s.zarr")
    assert s.n_slices == p.n_slices - 1 == summary.n_slices
    assert "ID_undecodable" not in set(s.image_id)
    assert s.quarantine.set_index("path").at[broken["undecodable"], "reason"] == "undecodable"
    # Every row holds a rendered slice (no hole): compare with a clean reference of each written file.
    exp = {w.image_id: w.expected for w in written}
    for r, iid in enumerate(s.image_id):
        if iid in exp:
            assert np.abs(np.asarray(s.images[r]).astype(int) - exp[iid]).max() <= 1


def test_cli_errors_are_one_line_and_come_before_any_work(archive, tmp_path, capsys) -> None:
    root, _, _ = archive
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "a.zarr"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "SOURCE" in err
    assert "nope" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Label\nID_x_epidural,7\n")
    assert main(["convert", str(root), str(tmp_path / "b.zarr"), "--labels", str(bad), "--quiet"]) == 2
    assert "bad.csv" in capsys.readouterr().err
    assert not (tmp_path / "b.zarr").exists()


def test_a_store_from_another_plan_is_refused_without_overwrite(archive, converted, capsys) -> None:
    root, _, _ = archive
    store_path, _, _ = converted
    assert main(["convert", str(root), str(store_path), "--shard-size", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "different plan" in err
    assert "--overwrite" in err
    assert err.count("\n") == 1


# ---------------------------------------------------------------------------------- real clusters


def test_scan_source_checks_inputs_before_listing_and_plan_conversion_keeps_the_csv(
    archive, converted, tmp_path
) -> None:
    """The stages `convert` and the Prefect flow share: the checks come before the tree is listed."""
    from ichdata.convert import plan_conversion, scan_source
    from ichdata.errors import UserError

    root, _, _ = archive
    store_path, _, expected = converted
    listed: list[int] = []
    with pytest.raises(UserError, match=r"--labels .*missing\.csv: no such file"):
        scan_source(
            ConvertConfig(root, tmp_path / "n.zarr", labels=tmp_path / "missing.csv"), on_total=listed.append
        )
    with pytest.raises(UserError, match="made from a different plan"):
        scan_source(ConvertConfig(root, store_path, shard_size=8), on_total=listed.append)
    with pytest.raises(UserError, match=r"SOURCE .*nope: no such folder"):
        scan_source(ConvertConfig(tmp_path / "nope", tmp_path / "n.zarr"), on_total=listed.append)
    assert listed == []

    csv = store_path.parent / "labels.csv"
    config = ConvertConfig(root, tmp_path / "fresh.zarr", labels=csv, shard_size=4)
    manifest = scan_source(config, on_total=listed.append)
    assert listed == [len(manifest)]
    p = plan_conversion(config, manifest)
    assert p.labels_source == str(csv)
    assert p.shard_size == 4
    for iid, lab in zip(p.rows["image_id"], p.labels, strict=True):
        np.testing.assert_array_equal(lab, expected.get(iid, np.full(len(CLASSES), 255)), err_msg=iid)


class _Killed(BaseException):
    """A kill, as far as the code under test can tell (not an `Exception` it could catch)."""


def test_a_run_killed_during_finalize_is_finished_by_the_next_run(
    archive, converted, tmp_path, monkeypatch
) -> None:
    """The documented limit of `finalize` (`ichdata.store`).

    Killed while it rewrites the small arrays, the store is refused until the next run, which finalizes it
    again without re-rendering a shard.
    """
    import ichdata.finalize
    from ichdata.errors import UserError

    root, _, _ = archive
    clean, _, _ = converted
    csv = clean.parent / "labels.csv"
    store = tmp_path / "k.zarr"
    real = ichdata.finalize.write_committed

    def killed(group, **arrays):
        group.create_array("labels", shape=(1,), dtype="uint8", overwrite=True)  # half-way through
        raise _Killed

    monkeypatch.setattr(ichdata.finalize, "write_committed", killed)
    config = ConvertConfig(root, store, labels=csv, shard_size=4)
    with pytest.raises(_Killed):
        convert(config, progress=False, client=None)
    with pytest.raises(UserError, match=r"has not finished .*finalizing"):
        open_store(store)

    monkeypatch.setattr(ichdata.finalize, "write_committed", real)
    again = convert(config, progress=False, client=None)
    assert (again.n_new, again.n_shards_written) == (0, 0)
    a, b = _snapshot(store), _snapshot(clean)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_failing_shard_task_names_its_shard_rows_and_files(archive, tmp_path, monkeypatch) -> None:
    import ichdata.shards

    root, _, _ = archive
    p = plan(scan(root), tmp_path / "s.zarr", shard_size=4)
    real = ichdata.shards.convert_shard

    def failing(store, index, *args):
        if index == 1:
            raise OSError(28, "No space left on device", store)
        return real(store, index, *args)

    monkeypatch.setattr(ichdata.shards, "convert_shard", failing)
    with pytest.raises(RuntimeError) as caught:
        convert_shards(p, None)
    first, last = p.rows["path"].iloc[4], p.rows["path"].iloc[7]
    assert str(caught.value) == (
        f"{p.store}: shard 1 (rows 4–7, 4 slices: {first} … {last}) failed: "
        f"OSError: [Errno 28] No space left on device: '{p.store}'"
    )
    assert isinstance(caught.value.__cause__, OSError)


_REAL: dict[str, Callable[..., object]] = {}


def _shard_3_fails(store, index, *args):
    """A stand-in for `ichdata.shards.convert_shard` that fails on shard 3.

    Module level: Dask ships it by reference, and it runs in the in-process cluster's worker threads,
    which see `_REAL`.
    """
    if index == 3:
        raise OSError(5, "Input/output error", store)
    return _REAL["convert_shard"](store, index, *args)


def test_a_failing_shard_inside_a_task_of_several_is_named(
    many, tmp_path, threads_client, monkeypatch
) -> None:
    """Tasks convert a few shards each (`group_size`).

    The error names the shard that raised, not the task's first, and the shards before it in the same task are
    written.
    """
    import ichdata.shards

    p = plan(scan(many), tmp_path / "s.zarr", shard_size=2)
    assert ichdata.shards.group_size(p.n_shards, 2) >= 4  # shard 3 shares shard 0's task
    monkeypatch.setitem(_REAL, "convert_shard", ichdata.shards.convert_shard)
    monkeypatch.setattr(ichdata.shards, "convert_shard", _shard_3_fails)
    with pytest.raises(
        RuntimeError, match=r"shard 3 \(rows 6–7, 2 slices: .*\) failed: OSError: \[Errno 5\]"
    ) as caught:
        convert_shards(p, threads_client)
    assert isinstance(caught.value.__cause__, OSError)
    markers = np.asarray(zarr.open_array(str(p.store / "conversion" / "shard_done"), mode="r")[:4])
    assert [m.split(":")[0] for m in markers[:3]] == [p.shard_key(i) for i in range(3)]
    assert markers[3] == ""


def test_a_task_that_fails_as_a_whole_names_all_its_shards(many, tmp_path) -> None:
    """A worker that dies (KilledWorker, after distributed's retries) fails the task, not one shard.

    Any of its shards may be the cause, so the message names them all.
    """
    from ichdata.convert import _shard_failed

    p = plan(scan(many), tmp_path / "s.zarr", shard_size=2)
    err = _shard_failed(p, [4, 5, 6], RuntimeError("worker died"))
    first, last = p.rows["path"].iloc[8], p.rows["path"].iloc[13]
    assert str(err) == (
        f"{p.store}: a task of 3 shards, 4–6 (rows 8–13, 6 slices: {first} … {last}) failed: "
        "RuntimeError: worker died"
    )
    assert str(_shard_failed(p, [4], OSError("x"))) == str(_shard_failed(p, 4, OSError("x")))


def test_tasks_shrink_to_single_shards_towards_the_end() -> None:
    from ichdata.shards import MAX_SHARDS_PER_TASK, group_size

    for n_shards, threads in ((1, 1), (7, 2), (64, 2), (190, 2), (11_763, 16), (5, 64)):
        sizes, left = [], n_shards
        while left:
            sizes.append(min(left, group_size(left, threads)))
            left -= sizes[-1]
        assert sum(sizes) == n_shards
        assert max(sizes) <= MAX_SHARDS_PER_TASK
        assert sizes == sorted(sizes, reverse=True)  # large tasks first, …
        last = min(len(sizes), threads)
        assert sizes[-last:] == [1] * last  # … one shard each for the last tasks
    assert group_size(64, 2) > 1  # fewer tasks than shards where there are many


def test_a_local_cluster_starts_when_port_8787_is_taken() -> None:
    """The scheduler's HTTP endpoint defaults to 8787, which another cluster or a user's Jupyter may hold.

    Distributed then warns (an error under this suite's filterwarnings).
    """
    import socket

    from ichdata.cluster import dask_client

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # already taken: the case under test anyway
            s.bind(("127.0.0.1", 8787))
            s.listen()
        with dask_client(workers=1) as client:
            assert client.submit(sum, [1, 2]).result() == 3
            (port,) = client.run_on_scheduler(lambda dask_scheduler: [dask_scheduler.http_server.port])
            assert port != 8787


@pytest.fixture(scope="module")
def many(tmp_path_factory, convert_inputs) -> Path:
    """~90 small slices: enough shards (of 2) for a kill to land mid-run."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(11)
    for k in range(6):
        for case in ("axial", "tilted", "coronal"):
            convert_inputs.write_case(root, case, rng, n=5, prefix=f"s{k}")
    return root


@pytest.fixture(scope="module")
def clean_run(many, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("clean") / "clean.zarr"
    convert(ConvertConfig(many, store, shard_size=2), progress=False, client=None)
    return store


def _assert_same_store(a: Path, b: Path) -> None:
    sa, sb = _snapshot(a), _snapshot(b)
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k


@pytest.mark.slow
def test_killing_a_worker_mid_run_still_gives_the_clean_store(many, clean_run, tmp_path) -> None:
    from distributed import Client, LocalCluster

    store = tmp_path / "w.zarr"
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # not 8787: it may be taken
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = list(client.run(os.getpid).values())
        killed: list[int] = []

        def kill_one(done) -> None:
            if not killed:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(done.index)

        p = plan(scan(many, client), store, shard_size=2)
        result = convert_shards(p, client, on_shard_done=kill_one)
        assert killed
        assert result.n_written >= p.n_shards
        finalize(result)
    _assert_same_store(store, clean_run)


@pytest.mark.slow
def test_killing_the_driver_then_rerunning_skips_finished_shards(many, clean_run, tmp_path) -> None:
    store = tmp_path / "d.zarr"
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "convert",
        str(many),
        str(store),
        "--workers",
        "2",
        "--shard-size",
        "2",
        "--quiet",
    ]
    markers = store / "conversion" / "shard_done" / "c"

    def n_markers() -> int:  # marker files only, not a temporary file a killed write left behind
        return sum(1 for p in markers.iterdir() if p.name.isdigit()) if markers.is_dir() else 0

    with (tmp_path / "driver.log").open("wb") as log:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and n_markers() < 3:
            time.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):  # (if it finished, the assertion below says so)
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the cluster it started
        proc.wait()
    n_done = n_markers()
    n_shards = -(-open_store(clean_run).n_slices // 2)
    driver_log = (tmp_path / "driver.log").read_text(errors="replace")
    assert 3 <= n_done < n_shards, (
        f"the kill must land mid-run: {n_done} of {n_shards} shards done\n{driver_log}"
    )
    with pytest.raises(Exception, match="has not finished"):
        open_store(store)
    summary = convert(
        ConvertConfig(store=store, source=many, cluster=ClusterConfig(workers=2)), progress=False
    )
    assert summary.n_shards_skipped >= n_done  # a marker is written after its shard: those are done
    assert summary.n_shards_skipped + summary.n_shards_written == n_shards
    _assert_same_store(store, clean_run)


_READER = """
import sys, numpy as np, zarr, tensorstore as ts
store, out = sys.argv[1], sys.argv[2]
g = zarr.open_group(store, mode="r")
arrays = {}
for name in ("images", "labels", "study_offsets", "slice_position", "series/n_slices"):
    a = g[name][...]
    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{store}/{name}"}}).result().read().result()
    assert a.dtype == t.dtype and a.shape == t.shape, name
    assert np.array_equal(a, t), name  # two independent Zarr v3 implementations agree
    arrays[name.replace("/", "_")] = t
arrays["image_id"] = np.array(g["image_id"][...].tolist())
np.savez(out, **arrays)
"""


def test_another_process_reads_the_same_values_with_zarr_and_tensorstore(converted, tmp_path) -> None:
    store_path, _, _ = converted
    out = tmp_path / "read.npz"
    subprocess.run([sys.executable, "-c", _READER, str(store_path), str(out)], check=True)
    got = np.load(out)
    s = open_store(store_path)
    assert np.array_equal(got["images"], np.asarray(s.images[...]))
    assert np.array_equal(got["labels"], s.labels)
    assert np.array_equal(got["study_offsets"], s.study_offsets)
    assert np.array_equal(got["slice_position"], s.slice_position)
    assert np.array_equal(got["series_n_slices"], s.series["n_slices"].to_numpy())
    assert got["image_id"].tolist() == list(s.image_id)


@pytest.mark.slow
def test_convert_runs_on_an_existing_cluster_by_address_or_scheduler_file(many, clean_run, tmp_path) -> None:
    import json

    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # not 8787: it may be taken
    ) as cluster:
        addr = cluster.scheduler_address
        assert addr.startswith("tcp://127.0.0.1:")
        a = tmp_path / "by_address.zarr"
        # A plain tcp cluster of the test's own: said so (`--insecure-scheduler`); TLS is the default.
        insecure = ["--insecure-scheduler", "--shard-size", "2", "--quiet"]
        assert main(["convert", str(many), str(a), "--scheduler", addr, *insecure]) == 0
        sf = tmp_path / "scheduler.json"
        sf.write_text(json.dumps({"address": addr}))
        b = tmp_path / "by_file.zarr"
        assert main(["convert", str(many), str(b), "--scheduler-file", str(sf), *insecure]) == 0
        assert len(cluster.scheduler.workers) == 2  # the cluster outlives the runs
    _assert_same_store(a, clean_run)
    _assert_same_store(b, clean_run)
    assert (
        main(
            ["convert", str(many), str(tmp_path / "c.zarr"), "--scheduler-file", str(tmp_path / "nope.json")]
        )
        == 2
    )


def test_overwrite_replaces_only_an_ich_store(archive, tmp_path) -> None:
    """`--overwrite` never deletes a regular file, nor a Zarr group that is not an ich store."""
    from ichdata.errors import UserError

    root, _, _ = archive
    somefile = tmp_path / "somefile"
    somefile.write_text("precious")
    with pytest.raises(UserError, match=r"somefile: exists and is not an ich store"):
        convert(ConvertConfig(root, somefile, overwrite=True), progress=False, client=None)
    assert somefile.read_text() == "precious"
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("x", shape=(1,), dtype="uint8")
    with pytest.raises(UserError, match=r"other\.zarr: exists and is not an ich store"):
        convert(ConvertConfig(root, other, overwrite=True), progress=False, client=None)
    assert (other / "x" / "zarr.json").is_file()
    real = tmp_path / "real.zarr"
    convert(ConvertConfig(root, real, shard_size=4), progress=False, client=None)
    replaced = convert(ConvertConfig(root, real, shard_size=8, overwrite=True), progress=False, client=None)
    assert replaced.n_new == replaced.n_slices
    assert open_store(real).shard_size == 8


def test_verify_and_quarantine_of_a_store_killed_in_finalize_say_it_is_unfinished(
    archive, converted, tmp_path, monkeypatch
) -> None:
    """`ich verify` and `ich quarantine` say in one line that the store is unfinished.

    They read a store even while it is incomplete, and used to fail on a small array that finalize
    had not rewritten yet.
    """
    import ichdata.finalize
    from ichdata.errors import UserError
    from ichdata.verify import verify_store

    root, _, _ = archive
    store = tmp_path / "k.zarr"

    def killed(group, **arrays):
        group.create_array("labels", shape=(1,), dtype="uint8", overwrite=True)  # half-way through
        raise _Killed

    monkeypatch.setattr(ichdata.finalize, "write_committed", killed)
    with pytest.raises(_Killed):
        convert(ConvertConfig(root, store, shard_size=4), progress=False, client=None)
    for read in (verify_store, lambda s: open_store(s, allow_incomplete=True)):
        with pytest.raises(UserError, match=r"has not finished.*re-run `ich convert`") as caught:
            read(store)
        assert "\n" not in str(caught.value)


def test_a_full_disk_ends_the_run_in_one_line_and_leaves_no_temporary_files(
    archive, tmp_path, monkeypatch
) -> None:
    """A write that fails with ENOSPC half-way through a shard.

    One line that says what to do, no `.tmp` file left behind, and the next run (with space again)
    completes the store.
    """
    import errno
    import pathlib

    from ichdata.errors import UserError

    root, _, _ = archive
    store = tmp_path / "full.zarr"
    real = pathlib.Path.write_bytes
    calls: list[int] = []

    def disk_full_at_the_third_shard(self: Path, data) -> int:
        calls.append(1)
        if len(calls) == 3:
            with self.open("wb") as f:
                f.write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full_at_the_third_shard)
    with pytest.raises(UserError, match=r"no space left on device") as caught:
        convert(ConvertConfig(root, store, shard_size=4), progress=False, client=None)
    assert "\n" not in str(caught.value)
    assert "re-run" in str(caught.value)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(pathlib.Path, "write_bytes", real)
    summary = convert(ConvertConfig(root, store, shard_size=4), progress=False, client=None)
    assert summary.n_shards_skipped >= 1
    assert summary.n_shards_skipped + summary.n_shards_written == -(-summary.n_slices // 4)
    assert open_store(store).n_slices == summary.n_slices


def test_workers_are_capped_at_the_usable_cores_unless_the_user_insists(caplog) -> None:
    """`--workers 1000` on a small machine used to start 1000 processes before any conversion."""
    from ichdata.cluster import dask_client, resolve_workers, usable_cpus

    cores = usable_cpus()
    with caplog.at_level("WARNING", logger="ichdata.cluster"):
        assert resolve_workers(1000) == cores
    (record,) = caplog.records
    assert record.getMessage() == (
        f"--workers 1000: this machine has {cores} usable cores; starting {cores} workers "
        "(--oversubscribe starts 1000)"
    )
    caplog.clear()
    assert resolve_workers(1000, oversubscribe=True) == 1000
    assert resolve_workers(None) == cores
    assert resolve_workers(1) == 1
    assert not caplog.records
    with caplog.at_level("WARNING", logger="ichdata.cluster"), dask_client(workers=cores + 1) as client:
        assert len(client.nthreads()) == cores
    assert len(caplog.records) == 1


_INTERRUPTED = """
import sys
from ichdata.config import ClusterConfig, ConvertConfig
from ichdata.convert import convert

try:
    convert(ConvertConfig(sys.argv[1], sys.argv[2], shard_size=2, cluster=ClusterConfig(workers=2)), progress=False)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""


@pytest.mark.slow
def test_ctrl_c_prints_no_worker_tracebacks(many, tmp_path) -> None:
    """Only the driver answers Ctrl-C (with its one line); the local cluster's workers print nothing.

    The terminal sends SIGINT to its whole foreground process group, the workers included.
    """
    store = tmp_path / "i.zarr"
    markers = store / "conversion" / "shard_done" / "c"
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED, str(many), str(store)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline
        and proc.poll() is None
        and not (markers.is_dir() and any(markers.iterdir()))
    ):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted"


# ----------------------------------------------------- nothing lost: inputs, foreign files, one writer


@pytest.fixture(scope="module")
def small(tmp_path_factory, convert_inputs) -> Path:
    """Two series of three slices: a conversion in this process takes about a second."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(5)
    for case in ("axial", "coronal"):
        convert_inputs.write_case(root, case, rng, n=3)
    return root


def _files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative path -> modification time): what a refused run must not touch."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ich: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_a_source_or_labels_inside_the_store_are_refused_before_anything_is_removed(
    small, tmp_path, capsys
) -> None:
    """Issue 16 item 1: SOURCE moved into STORE, then `--overwrite`, deleted SOURCE and exited 0."""
    src = tmp_path / "src"
    shutil.copytree(small, src)
    store = tmp_path / "st.zarr"
    convert(ConvertConfig(src, store, shard_size=2), progress=False, client=None)
    incoming = store / "incoming"
    shutil.move(src, incoming)
    before = _files(tmp_path)
    assert main(["convert", str(incoming), str(store), "--overwrite", "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert f"SOURCE {incoming}: inside STORE {store}" in err
    assert _files(tmp_path) == before
    # The store itself as SOURCE, and a label CSV inside the store or beside it as one of its files.
    assert main(["convert", str(store), str(store), "--overwrite", "--quiet"]) == 2
    assert f"SOURCE {store}: inside STORE {store}" in _one_line_error(capsys)
    csv = incoming / "labels.csv"
    csv.write_text("ID,Label\n")
    assert main(["convert", str(small), str(store), "--labels", str(csv), "--overwrite", "--quiet"]) == 2
    assert f"--labels {csv}: inside STORE {store}" in _one_line_error(capsys)
    side = manifest_path(store)
    assert main(["convert", str(small), str(store), "--labels", str(side), "--overwrite", "--quiet"]) == 2
    assert f"--labels {side}: the file {side} beside STORE" in _one_line_error(capsys)
    # Through a link to the store's folder: the same store.
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    assert main(["convert", str(incoming), str(link), "--quiet"]) == 2
    assert "inside STORE" in _one_line_error(capsys)
    assert _files(tmp_path) == {**before, "st.zarr/incoming/labels.csv": csv.stat().st_mtime_ns}


def test_a_store_inside_another_store_is_refused(small, tmp_path, capsys) -> None:
    """Issue 16 item 12: STORE inside an existing store's array made a group inside its chunks."""
    store = tmp_path / "st.zarr"
    convert(ConvertConfig(small, store, shard_size=2), progress=False, client=None)
    before = _files(tmp_path)
    for inner in (store / "images" / "x.zarr", store / "nested.zarr"):
        assert main(["convert", str(small), str(inner), "--quiet"]) == 2
        assert f"STORE {inner}: inside the ich store {store}; choose a path outside it" in _one_line_error(
            capsys
        )
    assert _files(tmp_path) == before


def test_a_missing_store_folder_is_refused_unless_parents(small, tmp_path, capsys) -> None:
    """Issue 16 item 12: a mistyped parent (`/nonexistent/x.zarr`) was created silently."""
    store = tmp_path / "typo" / "deeper" / "x.zarr"
    assert main(["convert", str(small), str(store), "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert f"the folder {store.parent} does not exist; create it, or pass --parents" in err
    assert not (tmp_path / "typo").exists()
    summary = convert(ConvertConfig(small, store, parents=True), progress=False, client=None)
    assert open_store(store).n_slices == summary.n_slices == 6


def test_overwrite_never_replaces_a_foreign_group_with_a_format_version(small, tmp_path) -> None:
    """Issue 16 item 2: any Zarr group with a `format_version` attribute used to pass for an ich store."""
    from ichdata.errors import UserError

    foreign = tmp_path / "theirs.zarr"
    g = zarr.open_group(str(foreign), mode="w", attributes={"format_version": 1, "classes": list(CLASSES)})
    g.create_array("images", shape=(2, 3, 4, 4), dtype="uint8")
    before = _files(tmp_path)
    with pytest.raises(UserError, match=r"theirs\.zarr: exists and is not an ich store"):
        convert(ConvertConfig(small, foreign, overwrite=True), progress=False, client=None)
    assert _files(tmp_path) == before


def test_a_store_of_an_earlier_ich_is_still_recognised_by_all_its_attributes_and_salt(
    small, tmp_path
) -> None:
    """Stores written before the `ich` attribute namespace: every attribute they had, and the salt beside."""
    from ichdata.errors import UserError
    from ichdata.store import ICH_ATTR, is_ich_store

    store = tmp_path / "old.zarr"
    convert(ConvertConfig(small, store, shard_size=2), progress=False, client=None)
    g = zarr.open_group(str(store), mode="r+")
    attrs = dict(g.attrs)
    assert attrs[ICH_ATTR] == {"kind": "store", "format_version": 1}
    del attrs[ICH_ATTR]
    g.attrs.put(attrs)  # as an earlier ich wrote it
    assert is_ich_store(store)
    salt = salt_path(store).read_bytes()
    salt_path(store).unlink()
    assert not is_ich_store(store)  # the attributes alone are not enough
    with pytest.raises(UserError, match="exists and is not an ich store"):
        convert(ConvertConfig(small, store, shard_size=4, overwrite=True), progress=False, client=None)
    salt_path(store).write_bytes(salt)
    replaced = convert(ConvertConfig(small, store, shard_size=4, overwrite=True), progress=False, client=None)
    assert open_store(store).shard_size == 4
    assert replaced.n_new == 6


def test_overwrite_refuses_a_store_holding_a_users_file_and_replaces_only_ichs(
    small, tmp_path, capsys
) -> None:
    """Issue 16 item 4: `--overwrite` deleted whatever a user had put inside the store."""
    store = tmp_path / "st.zarr"
    convert(ConvertConfig(small, store, shard_size=2), progress=False, client=None)
    notes = store / "my-notes.txt"
    notes.write_text("keep me\n")
    before = _files(tmp_path)
    assert main(["convert", str(small), str(store), "--overwrite", "--shard-size", "4", "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert f"STORE {store}: holds my-notes.txt, which ich did not write; move it out" in err
    assert _files(tmp_path) == before
    notes.unlink()
    # What ich wrote inside is replaced, down to a temporary file a killed write left behind.
    (store / "images" / "c" / "0" / "0" / "0" / ".0.123.456.tmp").write_bytes(b"partial")
    convert(ConvertConfig(small, store, shard_size=4, overwrite=True), progress=False, client=None)
    assert open_store(store).shard_size == 4
    assert not list(store.rglob("*.tmp"))


def test_a_run_refuses_a_users_file_in_a_folder_it_rewrites(small, tmp_path, capsys) -> None:
    """A commit rewrites the small arrays whole (their folders included): a file there would be lost."""
    src = tmp_path / "src"
    shutil.copytree(small, src)
    store = tmp_path / "st.zarr"
    convert(ConvertConfig(src, store, shard_size=2), progress=False, client=None)
    (store / "README.txt").write_text("ours\n")  # at the top: no run touches it
    kept = store / "labels" / "keep.txt"
    kept.write_text("keep me\n")
    shutil.copy(src / "axial" / "f00", src / "axial" / "f00_copy")  # something new to commit
    assert main(["convert", str(src), str(store), "--quiet"]) == 2
    assert f"STORE {store}: holds labels/keep.txt, which ich did not write" in _one_line_error(capsys)
    kept.unlink()
    convert(ConvertConfig(src, store), progress=False, client=None)
    assert (store / "README.txt").read_text() == "ours\n"


def test_a_resumed_run_removes_the_temporary_files_a_killed_one_left(small, tmp_path, convert_inputs) -> None:
    """`ich verify` lists them; the next run with work to do (under the lock) deletes them."""
    from ichdata.verify import verify_store

    src = tmp_path / "src"
    shutil.copytree(small, src)
    store = tmp_path / "st.zarr"
    convert(ConvertConfig(src, store, shard_size=2), progress=False, client=None)
    leftovers = [
        store / "images" / "c" / "1" / "0" / "0" / ".0.4242.1.tmp",  # ichdata.atomic's shard write
        store / "conversion" / "shard_done" / "c" / f"0.{'a' * 32}.partial",  # zarr's
    ]
    for p in leftovers:
        p.write_bytes(b"half")
    problems = verify_store(store).problems
    assert problems == [f"{p}: a temporary file a killed write left behind" for p in sorted(leftovers)]
    convert_inputs.write_case(src, "axial", np.random.default_rng(1), n=2, prefix="new")
    assert convert(ConvertConfig(src, store), progress=False, client=None).n_new == 2
    assert not any(p.exists() for p in leftovers)
    assert verify_store(store).ok


_PAUSED_CONVERT = """
import sys, time
from pathlib import Path
import ichdata.finalize
from ichdata.config import ClusterConfig, ConvertConfig
from ichdata.convert import convert

source, store, signals = sys.argv[1], sys.argv[2], Path(sys.argv[3])
real = ichdata.finalize.finalize

def paused(*args, **kwargs):
    # Every shard written, nothing committed: paused mid-run in the driver, holding the lock.
    (signals / "paused.tmp").write_text("paused")
    (signals / "paused.tmp").rename(signals / "paused")
    while not (signals / "go").exists():
        time.sleep(0.01)
    return real(*args, **kwargs)

ichdata.finalize.finalize = paused  # the driver imports it when it commits
print(convert(ConvertConfig(source, store, shard_size=2, cluster=ClusterConfig(workers=2)), progress=False))
"""


def test_a_second_run_on_a_store_being_written_is_refused_and_the_first_completes(
    small, tmp_path, tmp_path_factory, capsys
) -> None:
    """Issue 16 item 3: two runs on one store reported each other's counts, or left stray shards."""
    from ichdata.verify import verify_store

    store = tmp_path / "st.zarr"
    signals = tmp_path_factory.mktemp("signals")
    run1 = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_CONVERT, str(small), str(store), str(signals)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (signals / "paused").exists():
            assert run1.poll() is None, run1.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        before = _files(tmp_path)
        for extra in ([], ["--overwrite"], ["--shard-size", "4", "--overwrite"]):
            assert main(["convert", str(small), str(store), "--quiet", *extra]) == 2
            err = _one_line_error(capsys)
            assert f"{store}: locked by ich convert (pid {run1.pid} on " in err
        assert _files(tmp_path) == before  # the refused runs wrote and removed nothing
        (signals / "go").touch()
        out, err = run1.communicate(timeout=120)
    finally:
        if run1.poll() is None:
            run1.kill()
            run1.communicate()
    assert run1.returncode == 0, err
    assert out.startswith(f"{store}: wrote 6 slices (6 in store,")
    assert verify_store(store).ok
    assert not (tmp_path / "st.zarr.lock").exists()


def test_a_killed_run_leaves_its_lock_and_the_next_run_takes_it_over(small, tmp_path, lock_holder) -> None:
    store = tmp_path / "st.zarr"
    holder = lock_holder(store, "ich convert")
    holder.kill()
    holder.reap()
    assert (tmp_path / "st.zarr.lock").exists()
    summary = convert(ConvertConfig(small, store), progress=False, client=None)
    assert summary.n_slices == 6
    assert not (tmp_path / "st.zarr.lock").exists()
