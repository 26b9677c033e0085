"""The conversion: a DICOM archive → a sharded Zarr v3 store (`ichdata.store`), on a Dask cluster.

`ich convert SOURCE STORE [--labels CSV] [--workers N | --scheduler ADDRESS | --scheduler-file FILE]
[--shard-size K] [--overwrite]` runs `convert(ConvertConfig(...))`: it checks its inputs before any
work (SOURCE a folder, the label CSV readable, STORE absent or made from the same plan; each mistake is
a one-line `UserError`, exit 2), starts a LocalCluster (or joins the cluster named), shows a progress
bar for the scan and the conversion, and prints `ConvertSummary` as its one-line report (exit 0 when
the store is complete: set-aside files are not failures).

The stages are public functions that `convert` chains and that the Prefect `ingest` flow
(`flows.ingest`) wraps one task each, so that both run exactly the same code (pass the same
`distributed.Client` to the stages that take one):

    from ichdata.convert import (ConvertConfig, convert_shards, dask_client, finalize, plan_conversion,
                                 scan_source)
    from ichdata.verify import verify_store

    config = ConvertConfig(source, store, labels=csv, shard_size=None, overwrite=False)
    with dask_client(workers=None, scheduler=None, scheduler_file=None) as client:
        manifest = scan_source(config, client, on_progress=..., on_total=...)   # Manifest
        p = plan_conversion(config, manifest)                                   # Plan
        result = convert_shards(p, client, on_shard_done=lambda done: ...)      # ShardDone per shard
    summary = finalize(result, config=config)  # ConvertSummary; str() is the one-line report
    report = verify_store(store, client=None)  # VerifyReport; .ok, .problems

1. `scan_source`: `check_inputs(config)` (SOURCE, the CSV's path, `ichdata.plan.check_store`: a store
   of another plan costs a second, not a scan), then `ichdata.scan.scan`, header-only, in batches of
   files per task; unchanged files of the manifest kept beside the store (`previous_manifest`) are
   not read again; the store, its side files and the label CSV are left out when they live under
   SOURCE (`excluded_paths`).
2. `plan_conversion`: the label table (`ichdata.plan.load_labels`) and `ichdata.plan.plan`: store
   order, shards and their keys, set-aside files, labels (the CSV's path kept for the provenance);
   incremental on a store made by an earlier run of the same plan, a `UserError` on a store of
   another plan.
3. `convert_shards`: Dask tasks of a few consecutive shards each (up to `MAX_SHARDS_PER_TASK`, fewer
   towards the end: `_group_size`), which for each shard render its slices
   (`ichdata.dicom.read_rendered_layout` from the pixel layout the scan kept in the manifest: no second
   header parse), write the whole shard in one assignment (`images[a:b] = block`; zarr writes a whole
   shard atomically) and then its done-marker (`conversion/shard_done[i] = "<key>:<CRC-32 of the pixels>"`,
   a chunk of its own). Shards whose marker holds their key are skipped: a killed run resumes, an
   append redoes only the last partial shard and the new ones.
4. `finalize`: the driver writes the manifest beside the store (the commit record), then labels, ids,
   offsets, metadata, quarantine (and `STORE.quarantine.csv`), attributes; the store is complete.
   While it rewrites the small arrays (seconds, even for RSNA) the store's state is `finalizing` and
   `open_store` refuses it; a run killed in that window leaves the store unreadable until the next run
   with the same arguments, which re-plans from the manifest and finalizes again (`ichdata.store`).

The stages hold no state between calls: a Prefect task that retries one re-reads what it needs from
the store, and a flow killed anywhere is finished by the next run with the same arguments.

Why shards are written like this (measured on zarr 3.1.6): a partial write into a shard
reads-modifies-writes it, and two writers on one shard lost slices (zarr-python #3682/#3683);
`dask.array.to_zarr` with shards corrupted data (dask #12583). So exactly one task writes a shard, in
one assignment, and only the driver writes the small arrays.

A file that fails only when its pixels are decoded (undecodable compressed data: RSNA's
`ID_6431af929.dcm`) makes its shard task return the failure instead of writing that shard or the ones
after it in the task. The driver then waits for the few tasks in flight (at most two per worker thread
are submitted at a time, so a failure wastes at most that many tasks of up to `MAX_SHARDS_PER_TASK`
shards), moves the file to the quarantine, re-plans (later rows move up) and carries on: shards before
the failure keep their keys and are not redone, and `images` has no hole. Failures are recorded in the
store's attributes so that a resumed run plans without them from the start.

A worker that dies mid-task is replaced by distributed, which reruns its task elsewhere: the shard
write is atomic (a temporary file renamed over the old one), so the rerun simply writes it again.

On a cluster (SLURM, say): start `dask scheduler --scheduler-file $SCRATCH/sched.json` and
`dask worker --scheduler-file $SCRATCH/sched.json --nthreads 1 --nworkers 8` on the nodes (or use
dask-jobqueue), then `ich convert SOURCE STORE --scheduler-file $SCRATCH/sched.json`; SOURCE and STORE
must be on a file system every worker sees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichdata._kernels import warm_up  # Numba itself is imported on first use, not here
from ichdata.errors import UserError
from ichdata.plan import Plan, check_store, load_labels, plan
from ichdata.scan import Manifest, scan
from ichdata.store import (
    N_CHANNELS,
    base_attrs,
    create_images,
    create_shard_done,
    manifest_path,
    quarantine_csv_path,
    salt_path,
    shard_checksum,
    software_version,
    write_committed,
    write_images,
    write_quarantine_csv,
)

__all__ = [
    "ConvertConfig",
    "ConvertResult",
    "ConvertSummary",
    "ShardDone",
    "check_inputs",
    "convert",
    "convert_shards",
    "dask_client",
    "excluded_paths",
    "finalize",
    "plan",
    "plan_conversion",
    "previous_manifest",
    "scan",
    "scan_source",
]


@dataclass(frozen=True)
class ConvertConfig:
    """What `ich convert` was asked to do (saved, resolved, in the store's provenance)."""

    source: Path
    store: Path
    labels: Path | None = None
    workers: int | None = None
    scheduler: str | None = None
    scheduler_file: Path | None = None
    shard_size: int | None = None  # None: the existing store's, else store.DEFAULT_SHARD_SIZE
    overwrite: bool = False


@dataclass(frozen=True)
class ShardDone:
    """What a shard task reports: written (`failures` empty) or not (the files that failed to render)."""

    index: int
    key: str
    n_rows: int
    checksum: str = ""
    failures: tuple[tuple[str, str, str], ...] = ()  # (path relative to the source, reason, detail)
    elapsed_s: float = 0.0


@dataclass
class ConvertResult:
    """The outcome of `convert_shards`: the final plan (after pixel-time failures) and the counts."""

    plan: Plan
    n_shards: int
    n_written: int
    n_skipped: int
    pixel_failures: pd.DataFrame
    elapsed_s: float


@dataclass
class ConvertSummary:
    """The one-line report of a conversion (`str()`), and its figures."""

    store: Path
    n_slices: int  # rows in the store
    n_new: int  # rows this run added
    n_series: int
    n_studies: int
    n_files: int  # input files accounted for (store rows + quarantine rows)
    quarantined: dict[str, int]  # files set aside by this run, by reason
    n_quarantined_total: int
    n_shards_written: int
    n_shards_skipped: int
    elapsed_s: float = 0.0
    store_bytes: int = 0
    stages_s: dict[str, float] = field(default_factory=dict)

    @property
    def slices_per_s(self) -> float:
        return self.n_new / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        q = sum(self.quarantined.values())
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.quarantined.items()))
        return (
            f"{self.store}: wrote {self.n_new:,} slices ({self.n_slices:,} in store, {self.n_series:,} series, "
            f"{self.n_studies:,} studies); set aside {q:,} files" + (f" ({why})" if q else "") + f"; "
            f"{self.elapsed_s:.1f} s, {self.slices_per_s:,.0f} slices/s; store {self.store_bytes / 1e6:,.1f} MB"
        )


# --------------------------------------------------------------------------------------------- Dask


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
) -> Iterator[Any]:
    """A distributed `Client`: of an existing cluster (`scheduler` address or `scheduler_file`), or of a
    `LocalCluster` on 127.0.0.1 with `workers` processes (default: one per core) of one thread each,
    without a dashboard (the scheduler's HTTP endpoint on a free loopback port, never 8787) and with
    distributed's INFO logs silenced."""
    from distributed import Client

    if scheduler and scheduler_file:
        raise UserError("--scheduler and --scheduler-file: give one, not both")
    if scheduler or scheduler_file:
        if scheduler_file and not Path(scheduler_file).is_file():
            raise UserError(
                f"--scheduler-file {scheduler_file}: no such file; expected the file `dask scheduler` writes"
            )
        try:
            client = Client(
                scheduler,
                scheduler_file=None if scheduler_file is None else str(scheduler_file),
                timeout="30s",
            )
        except OSError as exc:
            raise UserError(f"--scheduler {scheduler or scheduler_file}: cannot connect ({exc})") from exc
        try:
            yield client
        finally:
            client.close()
        return
    n = _usable_cpus() if workers is None else workers
    if n < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    # distributed's INFO/WARNING chatter (and a heartbeat ERROR at shutdown) is noise for a user who
    # asked for a conversion; levels are restored when the cluster is gone.
    loggers = [
        logging.getLogger(n)
        for n in (
            "distributed",
            "distributed.worker",
            "distributed.scheduler",
            "distributed.nanny",
            "distributed.core",
        )
    ]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with _local_cluster(n) as cluster, Client(cluster) as client:
            yield client
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _local_cluster(n: int) -> Iterator[Any]:
    """A LocalCluster of `n` single-threaded worker processes on 127.0.0.1, without a dashboard."""
    import dask
    from distributed import LocalCluster

    settings: dict[str, Any] = {}
    if sys.platform == "linux" and dask.config.get("distributed.worker.multiprocessing-method") == "spawn":
        # Forked workers start in 0.4 s instead of 3.5 s (spawn re-imports distributed, pydicom and zarr
        # in each worker; measured on 2 cores): most of a small incremental ingest. zarr and logging reset
        # their locks after a fork. A method the user configured is left alone.
        settings["distributed.worker.multiprocessing-method"] = "fork"
        # Import what the tasks use before forking, so that each worker inherits it instead of paying
        # ~0.5 s of imports on its first task.
        import numcodecs.zstd  # noqa: F401
        import zarr  # noqa: F401

        import ichdata.dicom  # noqa: F401

        # Numba's first call in a process costs ≈ 0.6 s (import, typing context, the disk cache): paid
        # here once, the forked workers inherit the compiled render loop.
        warm_up()
    # Nobody looks at this cluster's diagnostics (it has no dashboard): no statistical profiler sampling
    # every task's stack every 10 ms in each worker, and slower housekeeping ticks: on 2 cores every
    # per cent of a core the cluster spends on itself is taken from the conversion.
    settings["distributed.worker.profile.enabled"] = False
    settings["distributed.admin.tick.interval"] = "500ms"
    settings["distributed.admin.system-monitor.interval"] = "2s"
    settings["distributed.worker.memory.monitor-interval"] = "500ms"
    # Nothing for work stealing or the active memory manager to do: the driver keeps at most two tasks
    # per worker thread in flight, and no task's result stays on a worker. Off, they cost the scheduler
    # no CPU on a core the workers need.
    settings["distributed.scheduler.work-stealing"] = False
    settings["distributed.scheduler.active-memory-manager.start"] = False
    with dask.config.set(settings):
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() in a process with threads (the cluster's event loop).
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*fork\(\).*")
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                # No dashboard; the scheduler still serves plain HTTP (health, metrics), which by default
                # listens on 8787 and, when that port is taken (another cluster, a user's Jupyter),
                # moves elsewhere with a UserWarning. A free loopback port from the start says nothing.
                dashboard_address=None,
                scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                # CRITICAL: at shutdown a worker logs an ERROR for the heartbeat its closing scheduler
                # no longer answers. Task failures reach the driver as exceptions, named by shard.
                silence_logs=logging.CRITICAL,
            )
        with cluster:
            yield cluster


def _usable_cpus() -> int:
    """Cores this process may run on (a batch job's allocation, not the whole node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------- shard task


def _convert_shard(
    store: str,
    index: int,
    start: int,
    key: str,
    sources: list[str | None],
    source_root: str,
    image_size: int,
    layouts: list[str] | None = None,
) -> ShardDone:
    """The Dask task of one shard: render every row, write the whole shard, then its done-marker.

    `sources[j]` is the file of row `start + j`, or None for a row already in the store (copied from
    there: an append rewrites the last partial shard without re-reading its old DICOMs). `layouts[j]`
    is the scan's pixel layout of that file (`ichdata.dicom.read_header_layout`; "" when unknown): the
    pixels are read without parsing the header a second time.
    """
    from ichdata.dicom import SliceError, read_rendered_layout

    t0 = time.perf_counter()
    images, markers = _open_for_shards(store)
    n = len(sources)
    block = np.empty((n, N_CHANNELS, image_size, image_size), dtype=np.uint8)
    n_old = sum(1 for s in sources if s is None)
    if n_old:
        if any(s is not None for s in sources[:n_old]) or any(s is None for s in sources[n_old:]):
            raise RuntimeError(f"shard {index}: rows already in the store must come first")
        block[:n_old] = images[start : start + n_old]
    failures: list[tuple[str, str, str]] = []
    for j in range(n_old, n):
        path = sources[j]
        assert path is not None
        try:
            read_rendered_layout(path, layouts[j] if layouts else "", image_size, out=block[j])
        except SliceError as exc:
            failures.append((os.path.relpath(path, source_root), exc.reason, exc.detail))
        except Exception as exc:  # a reader bug on one file must not stop a 752k-file run
            failures.append(
                (os.path.relpath(path, source_root), "undecodable", f"{type(exc).__name__}: {exc}")
            )
    if failures:
        return ShardDone(index, key, n, failures=tuple(failures), elapsed_s=time.perf_counter() - t0)
    write_images(images, start, block)
    checksum = shard_checksum(block)
    markers[index] = f"{key}:{checksum}"
    return ShardDone(index, key, n, checksum=checksum, elapsed_s=time.perf_counter() - t0)


#: Inside a shard group task (`_convert_shard_group`): the arrays it has opened, by store; else unset.
_OPEN = threading.local()


def _open_for_shards(store: str) -> tuple[Any, Any]:
    """The store's `images` and done-markers, opened read-write: once per shard group task (which keeps
    them for its shards: opening costs ≈ 2 ms, 3 % of a shard), else now."""
    opened: dict[str, tuple[Any, Any]] | None = getattr(_OPEN, "arrays", None)
    if opened is not None and store in opened:
        return opened[store]
    import zarr

    group: Any = zarr.open_group(store, mode="r+")
    arrays = (group["images"], group["conversion/shard_done"])
    if opened is not None:
        opened[store] = arrays
    return arrays


class ShardTaskError(Exception):
    """What a shard group task raises when one of its shards raised (not a bad file: an I/O error, a
    bug): the shard's index and the original exception, for the driver's message."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error

    def __str__(self) -> str:
        return f"shard {self.index}: {type(self.error).__name__}: {self.error}"


def _convert_shard_group(
    convert_one: Callable[..., ShardDone], jobs: list[tuple[Any, ...]]
) -> list[ShardDone]:
    """The Dask task of a few consecutive shards: `convert_one(*args)` (`_convert_shard`) for each of
    `jobs` in order, the store opened once. Stops after a shard with failures (the driver re-plans
    before any later shard is written); a shard that raises ends the task with a `ShardTaskError`
    naming it (the shards before it are written, and their markers say so)."""
    _OPEN.arrays = {}
    out: list[ShardDone] = []
    try:
        for args in jobs:
            try:
                done = convert_one(*args)
            except Exception as exc:
                raise ShardTaskError(args[1], exc) from exc
            out.append(done)
            if done.failures:
                break
    finally:
        _OPEN.arrays = None
    return out


#: Shards per task at most: 16 shards of 64 slices are ≈ 1 s of one worker.
MAX_SHARDS_PER_TASK = 16


def _group_size(remaining: int, n_threads: int) -> int:
    """Shards in the next task, given `remaining` shards still to submit: half of each worker thread's
    share (at most `MAX_SHARDS_PER_TASK`), so that tasks shrink towards the end, down to one shard
    (guided self-scheduling). Fewer, larger tasks cut distributed's cost per task (a few ms of the
    driver's CPU, on a core a worker needs, and of the worker's between two tasks) where there
    are many shards; the small last tasks keep every worker busy to the end. (A whole share per task
    was worse in a trial: with two tasks in flight per worker, the two largest could land on the same
    one.) `bench/convert_timeline.py` shows the tasks and how far apart the workers finish."""
    return max(1, min(MAX_SHARDS_PER_TASK, remaining // (2 * max(1, n_threads))))


# ----------------------------------------------------------------------------------------- stages


def _remove_store(store: Path) -> None:
    if store.exists():
        if store.is_dir() and not (store / "zarr.json").is_file() and any(store.iterdir()):
            raise UserError(f"STORE {store}: exists and is not an ich store; refusing to overwrite it")
        shutil.rmtree(store) if store.is_dir() else store.unlink()
    for p in (manifest_path(store), quarantine_csv_path(store)):
        p.unlink(missing_ok=True)


def prepare_store(p: Plan, *, overwrite: bool = False) -> Any:
    """Create the store for `p` (or grow it for an append): `images` sized to the plan, one
    done-marker per shard. Returns the open zarr group. Never touches committed rows."""
    import zarr

    store = p.store
    if overwrite:
        _remove_store(store)
    plan_attr = {"config": p.config, "config_hash": p.config_hash}
    if not (store / "zarr.json").is_file():
        group: Any = zarr.open_group(str(store), mode="w")
        group.attrs.update(
            {**base_attrs(p.image_size), "state": "converting", "shard_size": p.shard_size, "plan": plan_attr}
        )
        create_images(group, p.n_slices, p.shard_size, p.image_size)
        create_shard_done(group, p.n_shards)
        return group
    group = zarr.open_group(str(store), mode="r+")
    if "images" not in group:
        create_images(group, p.n_slices, p.shard_size, p.image_size)
    elif group["images"].shape[0] != p.n_slices:
        group["images"].resize((p.n_slices, N_CHANNELS, p.image_size, p.image_size))
    if "conversion/shard_done" not in group:
        create_shard_done(group, p.n_shards)
    elif group["conversion/shard_done"].shape[0] != p.n_shards:
        group["conversion/shard_done"].resize((p.n_shards,))
    if group.attrs.get("plan") != {**(group.attrs.get("plan") or {}), **plan_attr}:
        group.attrs["plan"] = {**(group.attrs.get("plan") or {}), **plan_attr}
    return group


def read_markers(group: Any) -> list[str]:
    """The done-marker of every shard ("" where none)."""
    arr = group["conversion/shard_done"]
    return [str(v) for v in arr[...]] if arr.shape[0] else []


def _record_failures(group: Any, failures: pd.DataFrame, p: Plan) -> None:
    info = p.rows.set_index("path")
    old = list(group.attrs.get("pixel_failures", []))
    seen = {f["path"] for f in old}
    for path, reason, detail in zip(failures["path"], failures["reason"], failures["detail"], strict=True):
        if path not in seen and path in info.index:
            old.append(
                {
                    "path": path,
                    "reason": reason,
                    "detail": detail,
                    "size": int(info.at[path, "size"]),
                    "mtime_ns": int(info.at[path, "mtime_ns"]),
                }
            )
    group.attrs["pixel_failures"] = old


def convert_shards(
    p: Plan,
    client: Any = None,
    on_shard_done: Callable[[ShardDone], None] | None = None,
    *,
    max_in_flight: int | None = None,
) -> ConvertResult:
    """Write every shard of `p` whose done-marker does not hold its key, in Dask tasks of a few shards.

    Without a client the shards are converted in this process, one after another. `on_shard_done` is
    called in the driver for each shard written (not for skipped ones). A task that fails for a reason
    other than a bad file (I/O error, a bug) raises here with the shard named. A plan made with
    `overwrite` replaces whatever is at the store first.
    """
    t0 = time.perf_counter()
    fresh = p.overwrite or not (p.store / "zarr.json").is_file()
    group = prepare_store(p, overwrite=p.overwrite)
    store = str(p.store)
    failures_all: list[tuple[str, str, str]] = []
    n_written = 0
    # A store made just now has no markers to read (reading them is ≈ 0.2 ms a shard).
    done_keys = [""] * p.n_shards if fresh else read_markers(group)
    n_skipped = sum(1 for i in range(p.n_shards) if _marker_key(done_keys, i) == p.shard_key(i))
    while True:
        todo = [i for i in range(p.n_shards) if _marker_key(done_keys, i) != p.shard_key(i)]
        new_failures: list[tuple[str, str, str]] = []
        for done in _run_shards(p, todo, client, max_in_flight, stop_on_failure=True):
            if done.failures:
                new_failures.extend(done.failures)
            else:
                n_written += 1
                if on_shard_done is not None:
                    on_shard_done(done)
        if not new_failures:
            break
        fdf = pd.DataFrame(new_failures, columns=["path", "reason", "detail"])
        _record_failures(group, fdf, p)
        failures_all.extend(new_failures)
        p = p.without(fdf)
        group = prepare_store(p)
        done_keys = read_markers(group)
    # Every shard must now hold its key (a stale writer cannot have overwritten a marker: failures are
    # handled only once every task in flight has finished).
    done_keys = read_markers(group)
    missing = [i for i in range(p.n_shards) if _marker_key(done_keys, i) != p.shard_key(i)]
    if missing:
        raise RuntimeError(f"{store}: shards {missing[:10]} have no done-marker after conversion")
    return ConvertResult(
        plan=p,
        n_shards=p.n_shards,
        n_written=n_written,
        n_skipped=n_skipped,
        pixel_failures=pd.DataFrame(failures_all, columns=["path", "reason", "detail"]),
        elapsed_s=time.perf_counter() - t0,
    )


def _marker_key(markers: list[str], i: int) -> str:
    return markers[i].split(":", 1)[0] if i < len(markers) else ""


def _shard_args(p: Plan, i: int) -> tuple[Any, ...]:
    a, _ = p.shard_rows(i)
    sources = p.shard_sources(i)
    return (str(p.store), i, a, p.shard_key(i), sources, str(p.source), p.image_size, p.shard_layouts(i))


def _shard_failed(p: Plan, shards: int | list[int], exc: BaseException) -> RuntimeError:
    """The error that ends a conversion when a shard task raised (not a bad file: those are set aside):
    the shard, its rows and files, and the task's exception (kept as `__cause__`). `shards` is the
    shard that raised, or the shards of a task that failed as a whole (its worker died, say): all are
    named, since any of them may be the cause."""
    group = [shards] if isinstance(shards, int) else shards
    a, b = p.shard_rows(group[0])
    last_b = p.shard_rows(group[-1])[1]
    paths = p.rows["path"]
    first, last = paths.iloc[a], paths.iloc[last_b - 1]
    files = str(first) if last_b - a == 1 else f"{first} … {last}"
    if len(group) == 1:
        what = f"shard {group[0]} (rows {a}–{b - 1}, {b - a} slices: {files})"
    else:
        n = sum(p.shard_rows(i)[1] - p.shard_rows(i)[0] for i in group)
        what = (
            f"a task of {len(group)} shards, {group[0]}–{group[-1]} (rows {a}–{last_b - 1}, {n} slices: "
            f"{files})"
        )
    return RuntimeError(f"{p.store}: {what} failed: {type(exc).__name__}: {exc}")


def _run_shards(
    p: Plan, todo: list[int], client: Any, max_in_flight: int | None, *, stop_on_failure: bool
) -> Iterator[ShardDone]:
    """Run the shard tasks of `todo`, a bounded number at a time, yielding each result as it lands.
    After a result with failures no new task is submitted; the ones in flight are drained."""
    if client is None:
        for i in todo:
            try:
                done = _convert_shard(*_shard_args(p, i))
            except Exception as exc:
                raise _shard_failed(p, i, exc) from exc
            yield done
            if done.failures and stop_on_failure:
                return
        return
    from distributed import as_completed

    n_threads = sum(client.nthreads().values())
    limit = max_in_flight or max(2, 2 * n_threads)
    pending = list(reversed(todo))
    # with_results: the results are fetched on the client's event loop as tasks finish, instead of one
    # blocking `Future.result()` round trip per task from this thread.
    ac = as_completed(with_results=True, raise_errors=False)
    stop = False

    shards_of: dict[str, list[int]] = {}
    # A key of this call's own: the scheduler may still hold a failed task of an earlier attempt under
    # the same shard key (its release is asynchronous), and would hand that error back instead of
    # running the shard again, which would make a Prefect retry of this stage a no-op.
    run = uuid.uuid4().hex[:8]

    def submit() -> None:
        group = [pending.pop() for _ in range(min(len(pending), _group_size(len(pending), n_threads)))]
        # `_convert_shard` is looked up now, not in the worker: a stand-in a test installs reaches it.
        fut = client.submit(
            _convert_shard_group,
            _convert_shard,
            [_shard_args(p, i) for i in group],
            key=f"ich-shard-{group[0]}-{p.shard_key(group[0])}-{len(group)}-{run}",
            priority=-group[0],
            pure=False,
        )
        shards_of[fut.key] = group
        ac.add(fut)

    while pending and ac.count() < limit:
        submit()
    for fut, result in ac:
        try:
            if fut.status != "finished":
                fut.result()  # raises the task's exception (or CancelledError)
            dones = result
        except Exception as exc:
            for other in list(ac.futures):
                other.cancel()
            if isinstance(exc, ShardTaskError):
                raise _shard_failed(p, exc.index, exc.error) from exc.error
            raise _shard_failed(p, shards_of[fut.key], exc) from exc
        finally:
            fut.release()
        for done in dones:
            if done.failures and stop_on_failure:
                stop = True
            yield done
        if pending and not stop:
            submit()


def finalize(
    result: ConvertResult, *, config: ConvertConfig | None = None, started: float | None = None
) -> ConvertSummary:
    """Commit a conversion: the manifest beside the store, then every small array, the quarantine CSV and
    the attributes; the store is `complete`. Only the driver calls this."""
    import zarr

    p = result.plan
    group: Any = zarr.open_group(str(p.store), mode="r+")
    # The manifest is the commit record: a run killed after this line re-plans to exactly this store.
    table = p.manifest_table()
    Manifest(p.source, table).write(manifest_path(p.store))
    group.attrs["state"] = "finalizing"
    quarantine = p.quarantine[["path", "reason", "detail"]]
    write_committed(
        group,
        labels=p.labels,
        image_ids=p.rows["image_id"].to_numpy(dtype=str),
        study_offsets=p.study_offsets,
        series=p.series,
        slice_position=p.rows["slice_position"].to_numpy(dtype=np.float64),
        source_path=p.rows["path"].to_numpy(dtype=str),
        quarantine=quarantine,
    )
    write_quarantine_csv(p.store, quarantine)
    prev = dict(group.attrs.get("provenance") or {})
    now = _now()
    by_reason = p.quarantined_by_reason()
    n_studies = int(p.series["study_uid"].nunique())
    provenance = {
        "source": str(p.source),
        "software": software_version(),
        "created": prev.get("created", now),
        "updated": now,
        "n_files": p.n_slices + len(p.quarantine),
        "n_converted": p.n_slices,
        "n_quarantined": len(p.quarantine),
        "quarantined_by_reason": by_reason,
        "labels": p.labels_source or prev.get("labels"),
        "n_labelled": int((p.labels[:, -1] != 255).sum()),
        "config": None
        if config is None
        else {
            k: (None if v is None else str(v) if isinstance(v, Path) else v)
            for k, v in config.__dict__.items()
        },
    }
    attrs = dict(group.attrs)
    attrs.pop("pixel_failures", None)
    attrs.update(
        {
            "state": "complete",
            "n_slices": p.n_slices,
            "n_series": len(p.series),
            "n_studies": n_studies,
            "shard_size": p.shard_size,
            "provenance": provenance,
            "plan": {"config": p.config, "config_hash": p.config_hash, "plan_hash": p.plan_hash},
            "shard_checksums": "conversion/shard_done",
        }
    )
    group.attrs.put(attrs)
    elapsed = (time.perf_counter() - started) if started is not None else result.elapsed_s
    return ConvertSummary(
        store=p.store,
        n_slices=p.n_slices,
        n_new=p.n_new,
        n_series=len(p.series),
        n_studies=n_studies,
        n_files=p.n_slices + len(p.quarantine),
        quarantined=p.quarantined_by_reason(new_only=True),
        n_quarantined_total=len(p.quarantine),
        n_shards_written=result.n_written,
        n_shards_skipped=result.n_skipped,
        elapsed_s=elapsed,
        store_bytes=_du(p.store),
    )


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


def excluded_paths(store: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None) -> list[Path]:
    """What the scan of a source must skip when the store, its side files or the label CSV live inside
    the source folder (RSNA's `stage_2_train.csv` sits beside the images): they are outputs and
    inputs of another kind, not files to account for."""
    out = [Path(store), manifest_path(store), quarantine_csv_path(store), salt_path(store)]
    if labels is not None:
        out.append(Path(labels))
    return out


def previous_manifest(store: str | os.PathLike[str], source: str | os.PathLike[str]) -> Manifest | None:
    """The manifest an earlier conversion kept beside `store`, for an incremental re-scan (or None)."""
    mp = manifest_path(store)
    return Manifest.read(mp, source) if mp.is_file() else None


def check_inputs(config: ConvertConfig) -> None:
    """The checks made before any work, each a one-line `UserError`: SOURCE is a folder, the label CSV
    (if any) is a file, and STORE is absent or was made from this plan (`ichdata.plan.check_store`).
    Cheap (a few `stat`s and the store's attributes): `scan_source` makes them again."""
    source, store = Path(config.source), Path(config.store)
    if not source.is_dir():
        raise UserError(f"SOURCE {source}: no such folder; expected a folder of DICOM files")
    if config.labels is not None and not Path(config.labels).is_file():
        raise UserError(f"--labels {config.labels}: no such file; expected an RSNA label CSV (ID,Label)")
    check_store(store, source, config.shard_size, config.overwrite)


def scan_source(
    config: ConvertConfig,
    client: Any = None,
    on_progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Manifest:
    """Stage 1: `check_inputs`, then the header-only scan of `config.source` on `client`'s cluster
    (`ichdata.scan.scan`; in this process without a client).

    Incremental against the manifest kept beside the store (`previous_manifest`; not with `overwrite`):
    unchanged files are not read again. The store, its side files and the label CSV are left out of the
    scan when they live under the source (`excluded_paths`). `on_total(n)` is called once the tree is
    listed, `on_progress(n)` as batches of `n` files finish.
    """
    check_inputs(config)
    source, store = Path(config.source), Path(config.store)
    return scan(
        source,
        client,
        previous=None if config.overwrite else previous_manifest(store, source),
        exclude=excluded_paths(store, config.labels),
        on_progress=on_progress,
        on_total=on_total,
    )


def plan_conversion(config: ConvertConfig, manifest: Manifest, labels: pd.DataFrame | None = None) -> Plan:
    """Stage 2: `ichdata.plan.plan` of `manifest` into `config.store`, with `config`'s shard size and
    `overwrite` and the label table (`labels` when the caller has read it already, else read from
    `config.labels`; a malformed CSV is a `UserError`). The CSV's path is kept in the plan for the
    store's provenance."""
    table = labels if labels is not None else load_labels(config.labels)
    p = plan(manifest, config.store, labels=table, shard_size=config.shard_size, overwrite=config.overwrite)
    return p if config.labels is None else replace(p, labels_source=str(config.labels))


def convert(
    config: ConvertConfig,
    progress: bool = True,
    client: Any = None,
) -> ConvertSummary:
    """`ich convert`: scan_source → plan_conversion → convert_shards → finalize, on `client` or a
    cluster of `config`'s.

    The inputs are checked and the label CSV is read first (a malformed CSV stops the run before any
    work, even before the cluster starts); progress bars (tqdm, on stderr) when `progress`.
    """
    started = time.perf_counter()
    if client is None and not (config.scheduler or config.scheduler_file):
        # The local cluster's workers fork from this process once the render kernels are warm
        # (`_local_cluster`): start on that now, beside the checks and the label CSV (seconds for RSNA's).
        threading.Thread(target=warm_up, name="ich-warm-kernels", daemon=True).start()
    check_inputs(config)
    labels = load_labels(config.labels)
    stages: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(dask_client(config.workers, config.scheduler, config.scheduler_file))
        t = time.perf_counter()
        bar = _bar(progress, "scan", "files")
        manifest = scan_source(config, client, on_progress=bar.update, on_total=bar.set_total)
        bar.close()
        stages["scan"] = time.perf_counter() - t
        t = time.perf_counter()
        p = plan_conversion(config, manifest, labels)
        stages["plan"] = time.perf_counter() - t
        t = time.perf_counter()
        bar = _bar(progress, "convert", "slices", total=p.n_new)
        result = convert_shards(p, client, on_shard_done=lambda d: bar.update(d.n_rows))
        bar.close()
        stages["convert"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = finalize(result, config=config, started=started)
    stages["finalize"] = time.perf_counter() - t
    summary.stages_s = stages
    return summary


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_total(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, desc: str, unit: str, total: int | None = None) -> Any:
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    class _Bar(tqdm):
        def set_total(self, n: int) -> None:
            self.total = n
            self.refresh()

    return _Bar(desc=desc, unit=f" {unit}", total=total, dynamic_ncols=True, leave=True)
