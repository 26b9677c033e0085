"""The Prefect `ingest` flow under Prefect's test harness, on small synthetic archives.

The flow runs against the session's test API server and an in-process Dask cluster, the operator's
scheduler of the runs (`operator_scheduler`, `conftest.py`);
stores are checked against the slices rendered straight from the DICOM files and the label CSV.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("prefect_api")

IMAGE_SIZE = 64  # DICOM rows/cols of the synthetic slices: small files, quick to write and render


# ------------------------------------------------------------------------------------------- helpers


def _archive(root: Path, studies: int, seed: int) -> tuple[Path, Path]:
    """A synthetic RSNA-format archive (flat folder + label CSV kept outside it): (folder, csv)."""
    from ichdata.testing import write_archive

    summary = write_archive(root / "archive", studies=studies, seed=seed, image_size=IMAGE_SIZE)
    csv = root / "labels.csv"
    shutil.move(summary.labels_csv, csv)
    return summary.path, csv


def _files_by_study(folder: Path) -> dict[str, list[Path]]:
    from ichdata.dicom import read_header

    out: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        out.setdefault(read_header(f).study_uid, []).append(f)
    return out


def _add_broken_files(folder: Path) -> dict[str, str]:
    """A text file and a truncated DICOM (in a subfolder): {relative path: expected reason}."""
    (folder / "README.txt").write_text("not a DICOM file\n")
    some = sorted(folder.glob("*.dcm"))[0].read_bytes()
    (folder / "partial").mkdir()
    (folder / "partial" / "copy_in_progress.dcm").write_bytes(some[: len(some) // 2])
    return {"README.txt": "not_dicom", "partial/copy_in_progress.dcm": "truncated"}


def _run(**params: Any) -> Any:
    """Run the flow; returns its final state (never raises for a failed run)."""
    from flows.ingest import ingest

    return ingest(**params, return_state=True)


def _artifacts(flow_run_id: UUID | None) -> dict[str | None, Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def _contents(store: Path) -> dict[str, Any]:
    """What a store holds, independent of series order: per image id its pixels and labels.

    Per series its image ids in slice order.
    """
    from ichdata.store import open_store

    s = open_store(store)
    images = np.asarray(s.images[: s.n_slices])
    per_image = {str(i): (images[r], s.labels[r]) for r, i in enumerate(s.image_id)}
    per_series = {
        str(uid): [str(i) for i in s.image_id[s.study_offsets[k] : s.study_offsets[k + 1]]]
        for k, uid in enumerate(s.series["series_uid"])
    }
    return {"images": per_image, "series": per_series, "quarantine": set(s.quarantine["path"])}


def _assert_same_contents(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["images"].keys() == b["images"].keys()
    for image_id, (pixels, labels) in a["images"].items():
        np.testing.assert_array_equal(pixels, b["images"][image_id][0], err_msg=image_id)
        np.testing.assert_array_equal(labels, b["images"][image_id][1], err_msg=image_id)
    assert a["series"] == b["series"]
    assert a["quarantine"] == b["quarantine"]


# ------------------------------------------------------------------------------- the flow, one shot


def test_ingest_writes_the_store_and_reports_it(tmp_path: Path, operator_scheduler: str) -> None:
    from ichdata.dicom import read_rendered
    from ichdata.labels import read_labels
    from ichdata.store import UNLABELLED, manifest_path, open_store

    folder, csv = _archive(tmp_path, studies=4, seed=11)
    n_dicom = len(list(folder.glob("*.dcm")))
    broken = _add_broken_files(folder)
    store = tmp_path / "rsna.zarr"

    state = _run(source=str(folder), store=str(store), labels=str(csv), shard_size=16)

    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary.n_slices, summary.n_new, summary.n_studies) == (n_dicom, n_dicom, 4)
    assert summary.quarantined == {"not_dicom": 1, "truncated": 1}

    # The store: every good file once, pixels as rendered from the file, labels as in the CSV, each
    # series contiguous in ascending slice position.
    s = open_store(store)
    assert s.n_slices == n_dicom
    images = np.asarray(s.images[: s.n_slices])
    labels = read_labels(csv)
    for row, path in enumerate(s.source_path):
        expected, meta = read_rendered(folder / path)
        assert s.image_id[row] == meta.image_id
        np.testing.assert_array_equal(images[row], expected, err_msg=str(path))
        want = labels.loc[meta.image_id].to_numpy() if meta.image_id in labels.index else UNLABELLED
        np.testing.assert_array_equal(s.labels[row], want, err_msg=str(path))
    for k in range(s.n_series):
        a, b = s.series_rows(k)
        assert np.all(np.diff(s.slice_position[a:b]) >= 0), f"series {k} is not in slice order"
    assert dict(zip(s.quarantine["path"], s.quarantine["reason"], strict=True)) == broken

    # The artifacts: the Markdown summary, the quarantine table, the progress bar at 100 %.
    arts = _artifacts(state.state_details.flow_run_id)
    assert set(arts) == {
        "ingest-summary-rsna-zarr",
        "ingest-quarantine-rsna-zarr",
        "ingest-progress-rsna-zarr",
    }
    md = arts["ingest-summary-rsna-zarr"].data
    assert f"| slices written by this run | {n_dicom:,} |" in md
    assert "| series / studies in the store | 4 / 4 |" in md
    n_labelled = int((s.labels[:, -1] != UNLABELLED).sum())
    assert summary.n_labelled == n_labelled > 0
    assert f"| images labelled | {n_labelled:,} of {n_dicom:,} |" in md
    assert "| not_dicom | 1 |" in md
    assert "| truncated | 1 |" in md
    assert "| verify | OK:" in md
    for heading in ("| elapsed |", "| throughput |", "| store size |"):
        assert heading in md
    # Nothing sent to Prefect names a file or folder under the source (issue 16 item 9): the table names
    # files as the store does, by their keys into the manifest beside it.
    table = json.loads(arts["ingest-quarantine-rsna-zarr"].data)
    manifest = pd.read_parquet(manifest_path(store))
    assert sorted((manifest["path"][int(r["path"][1:])], r["reason"]) for r in table) == sorted(
        broken.items()
    )
    for sent in (md, arts["ingest-quarantine-rsna-zarr"].data, arts["ingest-summary-rsna-zarr"].description):
        assert not any(name in sent for name in (str(folder), folder.name, str(csv), *broken)), sent
    assert float(arts["ingest-progress-rsna-zarr"].data) == 100.0


def test_ingest_keeps_file_names_in_the_store_only_when_asked(
    tmp_path: Path, operator_scheduler: str
) -> None:
    """`keep_paths` (issue 11 item 15): by default the store names files by manifest keys."""
    import zarr

    from ichdata.store import open_store

    folder, _ = _archive(tmp_path, studies=1, seed=16)
    names = sorted(p.name for p in folder.glob("*.dcm"))
    (folder / "notes.txt").write_text("not DICOM")
    for keep in (False, True):
        store = tmp_path / f"keep-{keep}.zarr"
        state = _run(source=str(folder), store=str(store), keep_paths=keep)
        assert state.is_completed(), state.message
        held = sorted(str(v) for v in np.asarray(zarr.open_array(str(store / "source_path"), mode="r")[...]))
        assert (held == names) is keep, held
        assert sorted(open_store(store).source_path) == names  # the manifest beside it names them
        arts = _artifacts(state.state_details.flow_run_id)
        table = arts[f"ingest-quarantine-keep-{str(keep).lower()}-zarr"].data
        summary = arts[f"ingest-summary-keep-{str(keep).lower()}-zarr"].data
        assert ("notes.txt" in table) is keep, table
        assert (str(folder) in summary) is keep, summary


def test_with_allowed_roots_a_path_outside_is_refused_and_no_error_shows_a_file(
    tmp_path: Path, operator_scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16 item 5: `-p labels=/etc/shadow` put the file's first line into the run's state."""
    allowed = tmp_path / "allowed"
    folder, _ = _archive(allowed, studies=1, seed=19)
    secret = "root:SECRET-77aa:19000:0:99999:7:::\n"
    (tmp_path / "shadow").write_text(secret)
    (allowed / "shadow").write_text(secret)
    store = allowed / "s.zarr"
    monkeypatch.setenv("ICH_ALLOWED_ROOTS", str(allowed))

    state = _run(source=str(folder), store=str(store), labels=str(tmp_path / "shadow"))
    assert state.is_failed()
    assert state.message.startswith("Flow run encountered an exception: UserError: parameter labels: ")
    assert "SECRET" not in state.message
    assert not store.exists()
    assert not list(allowed.glob("s.zarr*"))

    # Inside the roots, a file that is no label CSV: named, with its line, never what it holds.
    state = _run(source=str(folder), store=str(store), labels=str(allowed / "shadow"))
    assert state.is_failed()
    assert "shadow: line 1 names no column ID or Label" in state.message
    assert "SECRET" not in state.message


def test_the_flows_parameters_are_the_conversions_options() -> None:
    """Issue 16 item 14: the flow's form is `ConvertConfig`'s fields and `ClusterConfig`'s, declared there once.

    All but `ConvertConfig.cluster` (its fields are the flow's, flat), the operator's cluster options
    (`flows.deploy.OPERATOR_ONLY`: never a run's to choose) and `kind`, which is `cluster` as on the command
    line; plus the flow's own `verify`. Paths are `str` (a parameter is JSON), and so is `cluster`
    (Prefect reads the flow's signature without importing it, where `Literal` cannot be resolved).
    """
    import dataclasses
    import inspect

    from flows.deploy import OPERATOR_ONLY
    from flows.ingest import ingest
    from ichdata.config import ClusterConfig, ConvertConfig

    def parameter(f: dataclasses.Field[Any]) -> tuple[str, object]:
        annotation = "str" if f.name == "kind" else str(f.type).replace("Path", "str")
        return annotation, inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default

    assert set(OPERATOR_ONLY) == {"scheduler", "scheduler_file", "insecure_scheduler", "oversubscribe"}
    expected = {f.name: parameter(f) for f in dataclasses.fields(ConvertConfig) if f.name != "cluster"}
    for f in dataclasses.fields(ClusterConfig):
        if f.name not in OPERATOR_ONLY:
            expected["cluster" if f.name == "kind" else f.name] = parameter(f)
    expected["verify"] = ("bool", True)
    parameters = inspect.signature(ingest.fn).parameters.values()
    assert {p.name: (p.annotation, p.default) for p in parameters} == expected


def test_parents_creates_the_stores_folders_once_the_inputs_are_checked(
    tmp_path: Path, operator_scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`parents=true`, as `ich convert --parents`: a store in folders to make, inside the allowed roots."""
    allowed = tmp_path / "allowed"
    folder, csv = _archive(allowed, studies=1, seed=23)
    monkeypatch.setenv("ICH_ALLOWED_ROOTS", str(allowed))
    store = allowed / "new" / "deeper" / "s.zarr"

    state = _run(source=str(folder), store=str(store), verify=False)
    assert state.is_failed()
    assert f"the folder {store.parent} does not exist" in state.message
    # A refused run makes no folder.
    state = _run(source=str(folder), store=str(store), labels=str(allowed / "absent.csv"), parents=True)
    assert state.is_failed()
    assert f"--labels {allowed / 'absent.csv'}: no such file" in state.message
    assert not (allowed / "new").exists()

    state = _run(source=str(folder), store=str(store), labels=str(csv), parents=True, verify=False)
    assert state.is_completed(), state.message
    from ichdata.store import open_store

    assert open_store(store).n_slices == state.result().n_slices > 0


# ----------------------------------------------------------------------------------------- incremental


def test_incremental_ingest_equals_one_shot_and_survives_a_failed_run(
    tmp_path: Path, operator_scheduler: str, monkeypatch: pytest.MonkeyPatch, no_retry_delay: None
) -> None:
    """Half the studies, then all (with a failed attempt in between) → the same store as one ingest of all.

    Same slices, pixels, labels and series; only the series order differs (order of arrival).
    """
    import ichdata.shards
    from ichdata.store import open_store

    folder, csv = _archive(tmp_path, studies=6, seed=12)
    by_study = _files_by_study(folder)
    broken = _add_broken_files(folder)
    one_shot = tmp_path / "one_shot.zarr"
    state = _run(source=str(folder), store=str(one_shot), labels=str(csv), shard_size=16)
    assert state.is_completed(), state.message

    # A landing folder receives half the studies (and the broken files), then the rest. The store
    # lives under the landing folder's parent; the landing folder has the same name as the archive so
    # that source paths (relative to it) match the one-shot store's.
    landing = tmp_path / "landing" / "archive"
    landing.mkdir(parents=True)
    studies = sorted(by_study)
    first, second = studies[:3], studies[3:]
    for rel in broken:
        (landing / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / rel, landing / rel)
    for uid in first:
        for f in by_study[uid]:
            shutil.copy2(f, landing / f.name)
    store = tmp_path / "landing.zarr"
    params = {"source": str(landing), "store": str(store), "labels": str(csv)}
    state = _run(**params)
    assert state.is_completed(), state.message
    n_first = sum(len(by_study[u]) for u in first)
    assert state.result().n_new == n_first
    before = open_store(store)
    rows_before = np.asarray(before.images[: before.n_slices])

    for uid in second:
        for f in by_study[uid]:
            shutil.copy2(f, landing / f.name)

    # The append fails part-way: a shard task hits an I/O error on every try (retried twice).
    real = ichdata.shards.convert_shard
    attempts: list[int] = []
    monkeypatch.setattr(ichdata.shards, "convert_shard", _shard_failing_from(real, 1, attempts))
    state = _run(**params)
    assert state.is_failed()
    assert "disk quota exceeded" in state.message
    # Shards from 1 on fail. Shard 1 is submitted first in every try, so it is tried exactly 3 times
    # (first try + 2 retries); whether shard 2 also starts before shard 1's failure ends a try is a
    # race between the two worker threads.
    assert attempts.count(1) == 3
    assert set(attempts) <= {1, 2}
    # … and the store still opens, holding exactly what the first run committed.
    during = open_store(store)
    assert list(during.image_id) == list(before.image_id)
    np.testing.assert_array_equal(np.asarray(during.images[: during.n_slices]), rows_before)

    monkeypatch.setattr(ichdata.shards, "convert_shard", real)
    state = _run(**params)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.n_new == sum(len(by_study[u]) for u in second)
    assert summary.quarantined == {}  # set aside by the first run; not reported again
    assert _artifacts(state.state_details.flow_run_id)["ingest-quarantine-landing-zarr"].data in ("[]", [])

    after = open_store(store)
    np.testing.assert_array_equal(np.asarray(after.images[:n_first]), rows_before)  # untouched
    assert list(after.series["study_uid"][: len(before.series)]) == list(before.series["study_uid"])
    _assert_same_contents(_contents(store), _contents(one_shot))


_FAILING: dict[str, Any] = {}


def _shard_failing_from(real: Any, first_bad: int, attempts: list[int]) -> Any:
    """A stand-in for `ichdata.shards.convert_shard` whose shards from `first_bad` on raise OSError.

    It runs in the in-process cluster's worker threads; Dask ships it by reference (module attribute).
    """
    _FAILING.update(real=real, first_bad=first_bad, attempts=attempts)
    return _failing_shard


def _failing_shard(store: str, index: int, *args: Any) -> Any:
    _FAILING["attempts"].append(index)
    if index >= _FAILING["first_bad"]:
        raise OSError(122, "disk quota exceeded", store)
    return _FAILING["real"](store, index, *args)


# ------------------------------------------------------------------------------- failures end the run


def test_a_killed_first_ingest_resumes_and_skips_finished_shards(
    tmp_path: Path, operator_scheduler: str, monkeypatch: pytest.MonkeyPatch, no_retry_delay: None
) -> None:
    import ichdata.shards
    from ichdata.store import open_store

    folder, csv = _archive(tmp_path, studies=3, seed=13)
    store = tmp_path / "s.zarr"
    params = {"source": str(folder), "store": str(store), "labels": str(csv)}
    real = ichdata.shards.convert_shard
    monkeypatch.setattr(ichdata.shards, "convert_shard", _shard_failing_from(real, 2, []))
    failed = _run(**params, shard_size=8)
    assert failed.is_failed()
    # The message names the shard, its rows and files, and the error (shards from 2 on fail; with two
    # worker threads either of the first two failing shards may land first).
    assert re.search(
        r"shard ([23]) \(rows (16–23|24–31), 8 slices: ID_\w+\.dcm … ID_\w+\.dcm\) failed: OSError: "
        r"\[Errno 122\] disk quota exceeded",
        failed.message,
    ), failed.message
    with pytest.raises(Exception, match="has not finished"):
        open_store(store)  # a first conversion that did not finish is not offered to readers

    monkeypatch.setattr(ichdata.shards, "convert_shard", real)
    state = _run(**params)  # shard size: the store's (8)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.n_shards_skipped >= 2
    assert summary.n_shards_written + summary.n_shards_skipped == -(-summary.n_slices // 8)
    assert open_store(store).n_slices == len(list(folder.glob("*.dcm")))


def test_a_store_from_another_plan_fails_at_once_without_retries(
    tmp_path: Path, operator_scheduler: str, no_retry_delay: None
) -> None:
    folder, _ = _archive(tmp_path, studies=1, seed=14)
    store = tmp_path / "s.zarr"
    assert _run(source=str(folder), store=str(store), shard_size=8).is_completed()
    t0 = time.perf_counter()
    state = _run(source=str(folder), store=str(store), shard_size=16)
    assert state.is_failed()
    assert "made from a different plan" in state.message
    assert "--overwrite" in state.message
    assert time.perf_counter() - t0 < 30  # no retries of a mistake a retry cannot fix


def test_a_store_another_process_writes_fails_the_run_at_once_naming_it(
    tmp_path: Path, operator_scheduler: str, lock_holder: Any
) -> None:
    """Issue 16 item 3: one writer per store, a second `ich serve` or a node of the cluster included."""
    folder, _ = _archive(tmp_path, studies=1, seed=15)
    store = tmp_path / "s.zarr"
    holder = lock_holder(store, "ich convert")
    state = _run(source=str(folder), store=str(store))
    assert state.is_failed()
    assert f"{store}: locked by ich convert (pid {holder.pid} on " in state.message
    assert not store.exists()
    holder.release()
    assert _run(source=str(folder), store=str(store)).is_completed()
    assert not (tmp_path / "s.zarr.lock").exists()


_RELEASE = threading.Event()


def _stalled_shard(*args: Any) -> Any:
    _RELEASE.wait(60)
    raise OSError("stalled shard released by the test")


def test_a_stalled_conversion_times_out_instead_of_hanging(
    tmp_path: Path, operator_scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.ingest
    import ichdata.shards

    folder, _ = _archive(tmp_path, studies=1, seed=15)
    monkeypatch.setattr(ichdata.shards, "convert_shard", _stalled_shard)
    monkeypatch.setattr(flows.ingest, "_MIN_TIMEOUT_S", 2.0)
    monkeypatch.setattr(flows.ingest, "_CONVERT_S_PER_SLICE", 0.0)
    _RELEASE.clear()
    t0 = time.perf_counter()
    try:
        state = _run(source=str(folder), store=str(tmp_path / "s.zarr"))
    finally:
        _RELEASE.set()  # free the worker threads for the next tests
    assert state.is_failed()
    assert "timeout" in state.message.lower() or "timed out" in state.message.lower(), state.message
    assert time.perf_counter() - t0 < 30


def test_a_store_that_fails_verification_fails_the_run_with_its_report(
    tmp_path: Path, operator_scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ichdata.verify

    real = ichdata.verify.verify_store

    def corrupted(store: Any, client: Any = None) -> Any:
        report = real(store, client=client)
        report.problems.append("shard 0 (rows 0–7): checksum 0123456789ab… differs from the recorded …")
        return report

    monkeypatch.setattr(ichdata.verify, "verify_store", corrupted)
    folder, _ = _archive(tmp_path, studies=1, seed=16)
    state = _run(source=str(folder), store=str(tmp_path / "v.zarr"))
    assert state.is_failed()
    assert "failed verification" in state.message
    assert "shard 0 (rows 0–7): checksum" in state.message
    md = _artifacts(state.state_details.flow_run_id)["ingest-summary-v-zarr"].data
    assert "| verify | **FAILED**, see below |" in md
    assert "## Verification problems" in md
    assert "shard 0 (rows 0–7): checksum" in md


# ------------------------------------------------------------------------------ progress and logs


class _Recorder:
    """A run logger that keeps the messages it is given (and passes them on to the real one)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.messages: list[str] = []

    def info(self, msg: str, *args: Any) -> None:
        self.messages.append(msg % args)
        self.real.info(msg, *args)


def test_the_progress_artifact_and_the_log_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thousand shards over 100 s: the artifact advances every few seconds, the log every 30 s at most."""
    from types import SimpleNamespace

    import flows.ingest
    from ichdata.shards import ShardDone

    updates: list[tuple[float, float]] = []
    now = [0.0]
    monkeypatch.setattr(flows.ingest, "create_progress_artifact", lambda *a, **k: "artifact-id")
    monkeypatch.setattr(flows.ingest, "update_progress_artifact", lambda _id, v: updates.append((now[0], v)))
    lines: list[str] = []
    logger = SimpleNamespace(info=lambda msg, *args: lines.append(msg % args))
    plan = SimpleNamespace(n_new=10_000, n_shards=1000, store=Path("big.zarr"))
    progress = flows.ingest._ShardProgress(plan, logger, clock=lambda: now[0])  # type: ignore[arg-type]
    for i in range(1000):
        now[0] += 0.1
        progress(ShardDone(index=i, key="k", n_rows=10, elapsed_s=0.1))
    progress.finish()

    times = [t for t, _ in updates[:-1]]
    values = [v for _, v in updates]
    assert 20 <= len(times) <= 100 / flows.ingest._PROGRESS_EVERY_S + 1
    assert all(b - a >= flows.ingest._PROGRESS_EVERY_S - 1e-9 for a, b in itertools.pairwise(times))
    assert values == sorted(values)
    assert values[-1] == 100.0
    assert 0 < values[len(values) // 2] < 100.0  # it advances during the conversion
    assert 1 <= len(lines) <= 100 / flows.ingest._LOG_EVERY_S
    assert all(line.startswith("converted ") and " slices/s" in line for line in lines)


def test_a_run_of_many_shards_logs_no_line_per_shard(
    tmp_path: Path, operator_scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.ingest

    folder, csv = _archive(tmp_path, studies=2, seed=17)
    recorders: list[_Recorder] = []
    real = flows.ingest.get_run_logger

    def recording_logger() -> Any:
        recorders.append(_Recorder(real()))
        return recorders[-1]

    monkeypatch.setattr(flows.ingest, "get_run_logger", recording_logger)
    state = _run(
        source=str(folder),
        store=str(tmp_path / "s.zarr"),
        labels=str(csv),
        shard_size=1,
    )
    assert state.is_completed(), state.message
    n_shards = state.result().n_shards_written
    assert n_shards >= 40
    messages = [m for r in recorders for m in r.messages]
    assert not [m for m in messages if m.startswith("shard ")]
    assert not [m for m in messages if folder.name in m or str(csv) in m]  # issue 16 item 9
    assert len(messages) <= 10, messages


# --------------------------------------------------------------------------------------------- SLURM


@pytest.mark.slurm
@pytest.mark.slow
def test_ingest_on_slurm_jobs(slurm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cluster="slurm"`: the flow's workers are SLURM jobs (the site settings of `tests/slurm.py`).

    The store holds every slice and passes the flow's verification; no job is left afterwards.
    """
    import subprocess

    import dask

    folder, csv = _archive(tmp_path, studies=2, seed=18)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "slurm.zarr"
    with dask.config.set(slurm.site_settings(tmp_path)):
        state = _run(
            source=str(folder), store=str(store), labels=str(csv), shard_size=8,
            cluster="slurm", jobs=2, cores=1, memory="1GB", walltime="00:10:00",
        )  # fmt: skip
    assert state.is_completed(), state.message
    assert state.result().n_slices == len(list(folder.glob("*.dcm")))
    assert "| verify | OK:" in _artifacts(state.state_details.flow_run_id)["ingest-summary-slurm-zarr"].data
    squeue = subprocess.run(["squeue", "--noheader"], capture_output=True, text=True, check=True).stdout
    assert squeue.strip() == ""
    assert list(tmp_path.glob(".ich-dask-tls-*")) == []
