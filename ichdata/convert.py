"""The conversion: a DICOM archive → a sharded Zarr v3 store, on a Dask cluster (`ich convert`).

`convert(ConvertConfig(...))` chains four stages that the Prefect `ingest` flow (`flows.ingest`) wraps
one task each, so that both run the same code: `scan_source` (input checks, then `ichdata.scan`),
`plan_conversion` (`ichdata.plan`), `convert_shards` (this module schedules the shard tasks of
`ichdata.shards` and recovers from files that fail at pixel time) and `ichdata.finalize.finalize`.
The stages hold no state between calls: a killed run is finished by the next run with the same
arguments. The store's contract is in the README's store section. What a run is asked to do is an
`ichdata.config.ConvertConfig`. The stages' modules (pandas, zarr, pydicom) are imported when a stage
runs.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ichdata._kernels import numpy_unless_compiled
from ichdata.cluster import SMALL_JOB, OnDemandClient, check_cluster, cluster_client, resolve_client
from ichdata.errors import UserError, out_of_space
from ichdata.landing import incoming_dir
from ichdata.lock import lock_path, store_lock

if TYPE_CHECKING:
    import os

    import pandas as pd
    from distributed import Client
    from tqdm import tqdm
    from zarr import Group

    from ichdata.config import ConvertConfig
    from ichdata.finalize import ConvertResult, ConvertSummary
    from ichdata.plan import Plan
    from ichdata.scan import Manifest
    from ichdata.shards import ShardDone

__all__ = [
    "check_and_make_parents",
    "check_inputs",
    "convert",
    "convert_shards",
    "excluded_paths",
    "plan_conversion",
    "previous_manifest",
    "scan_source",
]


# How often the shard scheduler asks how many worker threads the cluster has now.
_THREADS_EVERY_S = 5.0


def _record_failures(group: Group, failures: pd.DataFrame, p: Plan) -> None:
    from ichdata.reasons import Reason

    info = p.rows.set_index("path")
    old: list[Any] = list(group.attrs.get("pixel_failures", []))  # type: ignore[arg-type]
    seen = {f["path"] for f in old}
    for path, reason, detail in zip(failures["path"], failures["reason"], failures["detail"], strict=True):
        # A file that changed while it was converted is not set aside again by a resumed run: its scan
        # reads the new version.
        if path not in seen and path in info.index and reason != Reason.CHANGED_DURING_CONVERSION:
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
    client: Client | OnDemandClient | None = None,
    on_shard_done: Callable[[ShardDone], None] | None = None,
    *,
    max_in_flight: int | None = None,
) -> ConvertResult:
    """Write every shard of `p` whose done-marker does not hold its key, in Dask tasks of a few shards.

    Without a client the shards are converted in this process, one after another; an
    `OnDemandClient` starts its cluster only when enough shards need writing (`SMALL_JOB` slices).
    `on_shard_done` is called in the driver for each shard written (not for skipped ones). A task that fails for a reason
    other than a bad file (I/O error, a bug) raises here with the shard named. A plan made with
    `overwrite` replaces whatever is at the store first.
    """
    import pandas as pd

    from ichdata.finalize import ConvertResult
    from ichdata.shards import marker_key, prepare_store, read_markers
    from ichdata.storefiles import remove_leftovers

    t0 = time.perf_counter()
    fresh = p.overwrite or not (p.store / "zarr.json").is_file()
    group = prepare_store(p, overwrite=p.overwrite)
    store = str(p.store)
    failures_all: list[tuple[str, str, str]] = []
    n_written = 0
    if not fresh and _committed(group, p):
        # The store holds this very plan, committed after every marker was checked: nothing to write,
        # and no marker to read (one file each).
        return ConvertResult(p, p.n_shards, 0, p.n_shards, _no_failures(), time.perf_counter() - t0)
    if not fresh:
        # Temporary files of writes a killed run left (`ich verify` lists them): safe to remove only
        # because the caller holds the store's lock, so no other writer has one in flight.
        remove_leftovers(p.store)
    # A store made just now has no markers: skip a read per shard.
    done_keys = [""] * p.n_shards if fresh else read_markers(group)
    n_skipped = sum(1 for i in range(p.n_shards) if marker_key(done_keys, i) == p.shard_key(i))
    while True:
        todo = [i for i in range(p.n_shards) if marker_key(done_keys, i) != p.shard_key(i)]
        new_failures: list[tuple[str, str, str]] = []
        work = sum(p.shard_rows(i)[1] - p.shard_rows(i)[0] for i in todo)
        started = resolve_client(client, work) if todo else None
        # A few slices in this process: no Numba start either (the same pixels).
        few = numpy_unless_compiled() if started is None and work <= SMALL_JOB else contextlib.nullcontext()
        with few:
            for done in _run_shards(p, todo, started, max_in_flight, stop_on_failure=True):
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
    missing = [i for i in range(p.n_shards) if marker_key(done_keys, i) != p.shard_key(i)]
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


def _no_failures() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([], columns=["path", "reason", "detail"])


def _committed(group: Group, p: Plan) -> bool:
    """Whether the store is complete and committed from a plan with `p`'s hash.

    The same hash means the same rows, series, labels and shard keys: every shard already holds its key.
    """
    attrs = group.attrs
    plan_attr = attrs.get("plan")
    return (
        not p.n_new
        and attrs.get("state") == "complete"
        and isinstance(plan_attr, dict)
        and plan_attr.get("plan_hash") == p.plan_hash
    )


def _shard_args(p: Plan, i: int) -> tuple[Any, ...]:
    a, _ = p.shard_rows(i)
    sources = p.shard_sources(i)
    return (
        str(p.store),
        i,
        a,
        p.shard_key(i),
        sources,
        str(p.source),
        p.image_size,
        p.shard_layouts(i),
        p.shard_identities(i),
    )


def _shard_failed(p: Plan, shards: int | list[int], exc: BaseException) -> Exception:
    """The error that ends a conversion when a shard task raised (not a bad file: those are set aside).

    It names the shard, its rows and files, and the task's exception (kept as `__cause__`). `shards` is
    the shard that raised, or the shards of a task that failed as a whole (its worker died, say): all
    are named, since any of them may be the cause. Workers that kept dying under the task (SLURM
    cancelled or killed their jobs) are a `UserError`: the message says what happened and how to resume.
    """
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return UserError(
            f"{p.store}: {_shards_named(p, shards)}: every worker that ran it died (SLURM jobs cancelled, "
            "out of memory or past their time limit?); the shards written are kept: re-run the same "
            "command to resume"
        )
    return RuntimeError(f"{p.store}: {_shards_named(p, shards)} failed: {type(exc).__name__}: {exc}")


def _shards_named(p: Plan, shards: int | list[int]) -> str:
    """A shard, or a task's shards, by rows and first and last file."""
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
    return what


def _run_shards(
    p: Plan, todo: list[int], client: Client | None, max_in_flight: int | None, *, stop_on_failure: bool
) -> Iterator[ShardDone]:
    """Run the shard tasks of `todo`, a bounded number at a time, yielding each result as it lands.

    After a result with failures no new task is submitted; the ones in flight are drained.
    """
    # The module, not its functions: a stand-in a test installs on `ichdata.shards` is found.
    from ichdata import shards

    if client is None:
        for i in todo:
            try:
                # Looked up now: a stand-in a test installs on `ichdata.shards` reaches it.
                done = shards.convert_shard(*_shard_args(p, i))
            except Exception as exc:
                raise _shard_failed(p, i, exc) from exc
            yield done
            if done.failures and stop_on_failure:
                return
        return
    from distributed import as_completed

    from ichdata.shards import ShardTaskError, convert_shard_group, group_size

    n_threads = sum(client.nthreads().values())
    limit = max_in_flight or max(2, 2 * n_threads)
    pending = list(reversed(todo))
    # with_results: the results are fetched on the client's event loop as tasks finish, instead of one
    # blocking `Future.result()` round trip per task from this thread.
    ac = as_completed(with_results=True, raise_errors=False)
    stop = False

    shards_of: dict[Any, list[int]] = {}
    # A key of this call's own: the scheduler may still hold a failed task of an earlier attempt under
    # the same shard key (its release is asynchronous), and would hand that error back instead of
    # running the shard again, which would make a Prefect retry of this stage a no-op.
    run = uuid.uuid4().hex[:8]
    threads_checked = time.monotonic()

    def submit() -> None:
        group = [pending.pop() for _ in range(min(len(pending), group_size(len(pending), n_threads)))]
        # `convert_shard` is looked up now, not in the worker: a stand-in a test installs reaches it.
        fut = client.submit(
            convert_shard_group,
            shards.convert_shard,
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
            if max_in_flight is None and time.monotonic() - threads_checked >= _THREADS_EVERY_S:
                # Workers join and leave while the tasks run (SLURM jobs start late or are replaced):
                # keep two tasks in flight per thread there is now.
                threads_checked = time.monotonic()
                n_threads = sum(client.nthreads().values())
                limit = max(2, 2 * n_threads)
                while pending and ac.count() < limit:
                    submit()


def excluded_paths(store: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None) -> list[Path]:
    """What the scan of a source must skip: the store, its side files and the label CSV.

    They may live inside the source folder (RSNA's `stage_2_train.csv` sits beside the images): they
    are outputs and inputs of another kind, not files to account for.
    """
    from ichdata.store import manifest_path, quarantine_csv_path, salt_path

    out = [Path(store), manifest_path(store), quarantine_csv_path(store), salt_path(store), lock_path(store)]
    if labels is not None:
        out.append(Path(labels))
    return out


def previous_manifest(store: str | os.PathLike[str], source: str | os.PathLike[str]) -> Manifest | None:
    """The manifest an earlier conversion kept beside `store`, for an incremental re-scan (or None)."""
    from ichdata.scan import Manifest
    from ichdata.store import manifest_path

    mp = manifest_path(store)
    return Manifest.read(mp, source) if mp.is_file() else None


def check_inputs(config: ConvertConfig) -> None:
    """The checks made before any work, each a one-line `UserError`.

    The cluster options make sense together (`ichdata.cluster.check_cluster`), SOURCE is a folder, the
    label CSV (if any) is a file, neither lies inside STORE, STORE's folder exists (or `--parents`)
    and is inside no other store (`ichdata.outputs.check_store_target`), and STORE is absent or was
    made from this plan (`ichdata.plan.check_store`); a run deletes nothing ich did not write:
    `--overwrite` replaces a store that holds nothing else, and a commit (which rewrites the small
    arrays whole) finds no other file in their folders (`ichdata.storefiles`). Cheap (a few `stat`s,
    the store's attributes, a walk of the store with `--overwrite`): `scan_source` makes them again,
    under the store's lock.
    """
    from ichdata.outputs import check_store_target
    from ichdata.resume import check_store
    from ichdata.store import REWRITTEN
    from ichdata.storefiles import StrayKind, check_metadata, check_replaceable, stray_files

    check_cluster(config.cluster)
    source, store = Path(config.source), Path(config.store)
    if not source.is_dir():
        raise UserError(f"SOURCE {source}: no such folder; expected a folder of DICOM files")
    if config.labels is not None and not Path(config.labels).is_file():
        raise UserError(f"--labels {config.labels}: no such file; expected an RSNA label CSV (ID,Label)")
    check_store_target(
        store, what="STORE", parents=config.parents, inputs={"SOURCE": source, "--labels": config.labels}
    )
    if config.overwrite:
        check_replaceable(store)
    check_store(store, source, config.shard_size, config.overwrite)
    if not config.overwrite and (store / "zarr.json").is_file():
        check_metadata(store)
        foreign = [s for s in stray_files(store, within=REWRITTEN) if s.kind is StrayKind.FOREIGN]
        if foreign:
            raise UserError(
                f"STORE {store}: holds {foreign[0].path}, which ich did not write, in a folder each run "
                "rewrites; move it out of the store"
            )


def check_and_make_parents(config: ConvertConfig) -> None:
    """`check_inputs`, then with `parents` STORE's missing parent folders: what comes before the store's lock.

    The lock file lives beside the store, so its folder must exist first; the checks come first, so that a
    refused run leaves no trace, not even a folder.
    """
    check_inputs(config)
    if config.parents:
        Path(config.store).absolute().parent.mkdir(parents=True, exist_ok=True)


def scan_source(
    config: ConvertConfig,
    client: Client | OnDemandClient | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Manifest:
    """Stage 1: `check_inputs`, then the header-only scan of `config.source` (`ichdata.scan.scan`).

    The scan runs on `client`'s cluster, or in this process without a client.

    Incremental against the manifest kept beside the store (`previous_manifest`; not with `overwrite`):
    unchanged files are not read again. The store, its side files and the label CSV are left out of the
    scan when they live under the source (`excluded_paths`), and so is a landing folder's incoming folder
    (`ichdata.landing`: studies still being fetched). `on_total(n)` is called once the tree is
    listed, `on_progress(n)` as batches of `n` files finish.
    """
    from ichdata.scan import scan

    check_inputs(config)
    source, store = Path(config.source), Path(config.store)
    previous = None if config.overwrite else previous_manifest(store, source)
    manifest = scan(
        source,
        client,
        previous=previous,
        # A landing folder's incoming studies are not whole yet (`ichdata.landing`).
        exclude=[*excluded_paths(store, config.labels), incoming_dir(source)],
        on_progress=on_progress,
        on_total=on_total,
    )
    manifest.previous = previous  # read once: the plan of this store takes it from here
    return manifest


def plan_conversion(config: ConvertConfig, manifest: Manifest, labels: pd.DataFrame | None = None) -> Plan:
    """Stage 2: `ichdata.plan.plan` of `manifest` into `config.store`, with `config`'s settings.

    The label table is `labels` when the caller has read it already, else read from `config.labels` (a
    malformed CSV is a `UserError`). The CSV's path is kept in the plan for the store's provenance.
    """
    from ichdata.plan import load_labels, plan

    table = labels if labels is not None else load_labels(config.labels)
    p = plan(manifest, config.store, labels=table, shard_size=config.shard_size, overwrite=config.overwrite)
    return p if config.labels is None else replace(p, labels_source=str(config.labels))


def convert(config: ConvertConfig, progress: bool = True, client: Client | None = None) -> ConvertSummary:
    """`ich convert`: scan_source → plan_conversion → convert_shards → finalize.

    Runs on `client`, or on a cluster of `config`'s. The inputs are checked and the label CSV is read
    first (a malformed CSV stops the run before any work, even before the cluster starts); progress
    bars (tqdm, on stderr) when `progress`. The whole run, from the checks on, holds the store's lock
    (`ichdata.lock.store_lock`: one writer per store; the workers never take it); a refused run writes
    nothing.
    """
    check_and_make_parents(config)
    try:
        with store_lock(config.store, command="ich convert"):
            return _convert(config, progress, client)
    except Exception as exc:
        error = out_of_space(exc, "re-run the same command to resume (nothing written is lost)", config.store)
        if error is None:
            raise
        raise error from exc


def _convert(config: ConvertConfig, progress: bool, client: Client | None) -> ConvertSummary:
    from ichdata.finalize import finalize
    from ichdata.plan import load_labels

    started = time.perf_counter()
    cluster = config.cluster
    local = cluster.kind == "local" and not (cluster.scheduler or cluster.scheduler_file)
    stages: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        # The label CSV (RSNA's: 4.5M rows, seconds) is parsed by Arrow, off the GIL, while the scan
        # lists and stats the source. It is known good before any work: before a cluster starts, and
        # before the scan when the caller's client would start work at once.
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="ich-labels"))
        parsed = pool.submit(load_labels, config.labels)
        if client is not None:
            parsed.result()

        def start_cluster() -> contextlib.AbstractContextManager[Client]:
            parsed.result()
            return cluster_client(cluster)

        # Started by the first stage with enough work for it: a re-run with nothing new starts no
        # cluster, and a small job on this machine (unless --workers asks for processes) runs here.
        runner: Client | OnDemandClient
        if client is not None:
            runner = client
        else:
            small = SMALL_JOB if local and cluster.workers is None else 0
            runner = OnDemandClient(start_cluster, stack, small_job=small, background=local)
        t = time.perf_counter()
        with _bar(progress, "scan", "file") as bar:
            manifest = scan_source(config, runner, on_progress=bar.update, on_total=_set_total(bar))
        labels = parsed.result()
        stages["scan"] = time.perf_counter() - t
        t = time.perf_counter()
        p = plan_conversion(config, manifest, labels)
        stages["plan"] = time.perf_counter() - t
        t = time.perf_counter()
        with _bar(progress, "convert", "slice", total=p.n_new) as bar:
            result = convert_shards(p, runner, on_shard_done=lambda d: bar.update(d.n_rows))
        stages["convert"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = finalize(result, config=config, started=started)
    stages["finalize"] = time.perf_counter() - t
    summary.stages_s = stages
    return summary


def _bar(progress: bool, desc: str, unit: str, total: int | None = None) -> tqdm[Any]:
    """A bar of `unit`s with their rate and, once `total` is known, the time left (tqdm's ETA)."""
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, total=total, dynamic_ncols=True, leave=True, disable=not progress)


def _set_total(bar: tqdm[Any]) -> Callable[[int], None]:
    """A callback that sets `bar`'s total once it is known (the scan lists the tree first)."""

    def set_total(n: int) -> None:
        bar.total = n
        bar.refresh()

    return set_total
