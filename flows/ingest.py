"""The Prefect `ingest` flow: a DICOM folder → the Zarr store, one Prefect task per stage.

scan → plan → convert → finalize → verify → report: each task wraps the `ichdata` function that does
the work (`ich convert` chains the same functions in `ichdata.convert.convert`), so the UI shows
where a run is and which stage failed, and a stage that hits a transient I/O error is retried on
its own; errors a retry cannot fix fail at once. The conversion is plain Dask inside one Prefect task
(thousands of shard tasks would cost far more as Prefect tasks, and the workers need no Prefect
API). Every task has a timeout; a failed or killed run is finished by the next run with the same
parameters. The README's ingest section is the user's guide.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, get_args
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows.deploy import allowed_path, run_roots, run_scheduler
from ichdata import pathkeys
from ichdata.cluster import cluster_client
from ichdata.config import ClusterConfig, ClusterKind, ConvertConfig
from ichdata.errors import UserError
from ichdata.finalize import ConvertResult, ConvertSummary
from ichdata.lock import store_lock
from ichdata.shards import ShardDone

if TYPE_CHECKING:
    import logging

    from distributed import Client
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import State
    from prefect.tasks import Task

    from ichdata.plan import Plan
    from ichdata.scan import Manifest
    from ichdata.verify import VerifyReport

# Timeouts (seconds). Generous: they exist so that a stalled run ends, not to police slow ones.
_SCAN_TIMEOUT_S = 6 * 3600.0  # header-only: RSNA's 752k files take minutes, not hours
_PLAN_TIMEOUT_S = 3600.0
_FINALIZE_TIMEOUT_S = 3600.0
_MIN_TIMEOUT_S = 900.0  # floor of the scaled timeouts (cluster start-up, a slow first shard)
_CONVERT_S_PER_SLICE = 2.0  # per worker thread: far more than reading and rendering a slice takes
_VERIFY_S_PER_SLICE = 0.5  # per worker thread: re-reading a stored slice is far cheaper still
#: Rows of the quarantine table artifact; the full list is `ich quarantine STORE` / STORE.quarantine.csv.
QUARANTINE_ROWS_SHOWN = 1000
# The progress artifact is an API call per update; the run's log is read by people, so a summary
# line now and then, never one per shard or per file.
_PROGRESS_EVERY_S = 3.0
_LOG_EVERY_S = 30.0


class StoreInvalid(RuntimeError):
    """`verify` found problems in the store it just wrote; `report` holds them."""

    def __init__(self, report: VerifyReport) -> None:
        super().__init__(str(report))
        self.report = report


def _is_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only what a second try can fix.

    An I/O error (file system, network, a lost Dask worker connection) anywhere in the exception's
    chain, but not a task timeout.
    """
    from prefect.task_engine import TaskRunTimeoutError

    exc: BaseException | None = state.data if isinstance(state.data, BaseException) else None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TaskRunTimeoutError):
            return False
        if isinstance(exc, OSError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


_IO_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": _is_transient,
    # Inputs are a Dask client, manifests and plans (large, not worth hashing), and the store is state
    # outside Prefect: caching would be wrong, so results are neither cached nor persisted.
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


def _slug(text: str) -> str:
    """An artifact key from a store path: lowercase letters, digits and dashes (Prefect's rule)."""
    return re.sub(r"[^a-z0-9]+", "-", Path(text.rstrip("/")).name.lower()).strip("-") or "store"


def _cluster_kind(value: str) -> ClusterKind:
    """The `cluster` parameter, checked (the flow's signature cannot say `Literal` to Prefect)."""
    if value not in get_args(ClusterKind):
        raise UserError(f"parameter cluster is {value!r}; expected one of {', '.join(get_args(ClusterKind))}")
    return cast(ClusterKind, value)


def _path(
    name: str, value: str, expected: str, roots: tuple[Path, ...] | None, *, store: bool = False
) -> Path:
    """A path parameter, under the deployment's allowed roots (`flows.deploy.allowed_path`).

    An empty one is refused: an unset `{{ $VAR }}` in prefect.yaml gives an empty value, which would
    mean the current directory.
    """
    if not value.strip():
        raise UserError(f"parameter {name} is empty; expected {expected}")
    return allowed_path(name, value, roots, store=store)


def _run_roots() -> tuple[Path, ...] | None:
    """The roots this run's paths must lie under (`flows.deploy.run_roots`); a deployment run always has some."""
    from prefect.runtime import deployment

    return run_roots(as_deployment=deployment.id is not None)


def _scaled_timeout(n_slices: int, s_per_slice: float, client: Client | None) -> float:
    threads = sum(client.nthreads().values()) if client is not None else 1
    return max(_MIN_TIMEOUT_S, n_slices * s_per_slice / max(1, threads))


# ---------------------------------------------------------------------------------------------- tasks


@task(name="scan", timeout_seconds=_SCAN_TIMEOUT_S, **_IO_RETRIES)
def scan_task(config: ConvertConfig, client: Client | None) -> Manifest:
    """`ichdata.convert.scan_source`: check the inputs, then scan `config.source`.

    A store made from another plan fails here, before any file is read; the scan is incremental
    against the manifest kept beside the store. Logs the progress every `_LOG_EVERY_S` at most and a
    summary at the end.
    """
    from ichdata.convert import scan_source

    logger = get_run_logger()
    counted = {"files": 0, "total": 0, "logged": time.monotonic()}

    # The source folder is not named: its name may name a patient (`keep_paths` off), and logs go to Prefect.
    def on_total(n: int) -> None:
        counted["total"] = n
        logger.info("scan: %s files to account for", f"{n:,}")

    def on_progress(n: int) -> None:
        counted["files"] += n
        now = time.monotonic()
        if now - counted["logged"] >= _LOG_EVERY_S:
            counted["logged"] = now
            logger.info("scanned %s of %s files", f"{counted['files']:,}", f"{counted['total']:,}")

    manifest = scan_source(config, client, on_progress=on_progress, on_total=on_total)
    reasons = manifest.reasons()
    logger.info(
        "scan: %s files, %s usable slices%s",
        f"{len(manifest):,}",
        f"{manifest.n_slices:,}",
        "; not slices: " + ", ".join(f"{n:,} {r}" for r, n in reasons.items()) if reasons else "",
    )
    return manifest


@task(name="plan", timeout_seconds=_PLAN_TIMEOUT_S, **_IO_RETRIES)
def plan_task(config: ConvertConfig, manifest: Manifest) -> Plan:
    """`ichdata.convert.plan_conversion`: the labels, the store order and the shards.

    Appends to an existing store.
    """
    from ichdata.convert import plan_conversion

    p = plan_conversion(config, manifest)
    new_q = p.quarantined_by_reason(new_only=True)
    get_run_logger().info(
        "plan: %s slices to write in %s shards of %d (%s already in the store), %s series; set aside: %s",
        f"{p.n_new:,}",
        f"{p.n_shards:,}",
        p.shard_size,
        f"{p.n_existing:,}",
        f"{len(p.series):,}",
        ", ".join(f"{n:,} {r}" for r, n in new_q.items()) or "none new",
    )
    return p


class _ShardProgress:
    """`on_shard_done` of the convert task: a throttled progress artifact and a summary line now and then.

    The artifact advances at most every `_PROGRESS_EVERY_S`, the log gets a line at most every
    `_LOG_EVERY_S`; `clock` is `time.monotonic` but for tests.
    """

    def __init__(
        self,
        p: Plan,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.clock = clock
        self.total = max(1, p.n_new)
        self.n_shards = p.n_shards
        self.rows = 0
        self.shards = 0
        self.t0 = clock()
        self.last_update = self.t0
        self.last_log = self.t0
        # `create_progress_artifact` is sync here (async only when called from a coroutine).
        self.artifact_id = cast(
            UUID,
            create_progress_artifact(
                0.0,
                key=f"ingest-progress-{_slug(str(p.store))}",
                description=f"Slices converted into {p.store}",
            ),
        )

    def __call__(self, done: ShardDone) -> None:
        self.shards += 1
        self.rows += done.n_rows
        now = self.clock()
        if now - self.last_update >= _PROGRESS_EVERY_S:
            self.last_update = now
            update_progress_artifact(self.artifact_id, min(99.0, 100.0 * self.rows / self.total))
        if now - self.last_log >= _LOG_EVERY_S:
            self.last_log = now
            rate = self.rows / max(1e-9, now - self.t0)
            left = (self.total - self.rows) / rate if rate > 0 else float("nan")
            self.logger.info(
                "converted %s of %s slices (%d shards this run), %.0f slices/s, about %.0f s left",
                f"{self.rows:,}",
                f"{self.total:,}",
                self.shards,
                rate,
                left,
            )

    def finish(self) -> None:
        update_progress_artifact(self.artifact_id, 100.0)


@task(name="convert", **_IO_RETRIES)
def convert_task(p: Plan, client: Client | None) -> ConvertResult:
    """`ichdata.convert.convert_shards`: render and write every shard not done yet, on the Dask cluster.

    A file that fails at pixel time is set aside and the run carries on; a shard task that raises
    (I/O error, a bug, a worker killed repeatedly) fails this task with the shard named.
    """
    from ichdata.convert import convert_shards

    logger = get_run_logger()
    progress = _ShardProgress(p, logger)
    result = convert_shards(p, client, on_shard_done=progress)
    progress.finish()
    logger.info(
        "convert: %d shards written, %d already done, in %.1f s%s",
        result.n_written,
        result.n_skipped,
        result.elapsed_s,
        f"; {len(result.pixel_failures)} files failed to decode and were set aside"
        if len(result.pixel_failures)
        else "",
    )
    return result


@task(name="finalize", timeout_seconds=_FINALIZE_TIMEOUT_S, **_IO_RETRIES)
def finalize_task(result: ConvertResult, config: ConvertConfig, started: float) -> ConvertSummary:
    """`ichdata.finalize.finalize`: commit the run (manifest, labels, ids, offsets, quarantine, attributes)."""
    from ichdata.finalize import finalize as finalize_store

    summary = finalize_store(result, config=config, started=started)
    get_run_logger().info("%s", summary)
    return summary


@task(name="verify", **_IO_RETRIES)
def verify_task(store: str, client: Client | None) -> VerifyReport:
    """`ichdata.verify.verify_store`: re-read every shard and account for every input file.

    Raises `StoreInvalid` (with the report) when anything is wrong.
    """
    from ichdata.verify import verify_store

    report = verify_store(store, client=client)
    if not report.ok:
        raise StoreInvalid(report)
    get_run_logger().info("%s", report)
    return report


def summary_markdown(
    summary: ConvertSummary, config: ConvertConfig, report: VerifyReport | None, verify_error: str | None
) -> str:
    """The Markdown of the summary artifact: what the run did, the store's totals, and the verification."""
    q_new = sum(summary.quarantined.values())
    if report is not None:
        verified = f"OK: {report.n_shards:,} shards re-read in {report.elapsed_s:.1f} s"
    elif verify_error is not None:
        verified = "**FAILED**, see below"
    else:
        verified = "skipped (`verify=false`)"
    hidden = "not shown (file and folder names stay on this machine unless `keep_paths`)"
    lines = [
        f"# Ingest into `{summary.store}`",
        "",
        "| | |",
        "| --- | --- |",
        f"| source | `{config.source}` |" if config.keep_paths else f"| source | {hidden} |",
        (f"| labels | `{config.labels}` |" if config.keep_paths else f"| labels | a label CSV, {hidden} |")
        if config.labels
        else "| labels | none (every slice stored as unlabelled, 255) |",
        *(
            [f"| images labelled | {summary.n_labelled:,} of {summary.n_slices:,} |"]
            if summary.n_labelled is not None
            else []
        ),
        f"| slices written by this run | {summary.n_new:,} |",
        f"| slices in the store | {summary.n_slices:,} |",
        f"| series / studies in the store | {summary.n_series:,} / {summary.n_studies:,} |",
        f"| files set aside by this run | {q_new:,} |",
        f"| files set aside, all runs | {summary.n_quarantined_total:,} |",
        f"| elapsed | {summary.elapsed_s:.1f} s |",
        f"| throughput | {summary.slices_per_s:,.1f} slices/s |",
        f"| store size | {summary.store_bytes / 1e6:,.1f} MB |",
        f"| shards written / already done | {summary.n_shards_written:,} / {summary.n_shards_skipped:,} |",
        f"| verify | {verified} |",
        "",
        "## Files set aside by this run, by reason",
        "",
    ]
    if summary.quarantined:
        lines += ["| reason | files |", "| --- | ---: |"]
        lines += [f"| {r} | {n:,} |" for r, n in sorted(summary.quarantined.items())]
    else:
        lines.append("None.")
    if summary.stages_s:
        lines += ["", "## Time per stage", "", "| stage | s |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in summary.stages_s.items()]
    if verify_error is not None:
        lines += ["", "## Verification problems", "", "```", verify_error, "```"]
    return "\n".join(lines) + "\n"


@task(name="report", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, persist_result=False)
def report_task(
    summary: ConvertSummary,
    config: ConvertConfig,
    p: Plan,
    verified: VerifyReport | None,
    verify_error: str | None = None,
) -> str:
    """Prefect artifacts of the run: the Markdown summary and the table of files set aside by this run.

    The table shows the first `QUARANTINE_ROWS_SHOWN` (the store keeps them all), each file named as the
    store names it: by its key into the manifest beside the store (`ichdata.pathkeys`), its path only
    with `keep_paths`. Returns the Markdown.
    """
    slug = _slug(str(summary.store))
    markdown = summary_markdown(summary, config, verified, verify_error)
    create_markdown_artifact(markdown, key=f"ingest-summary-{slug}", description=str(summary))
    q = p.new_quarantine()
    shown = q.head(QUARANTINE_ROWS_SHOWN)
    paths, details = shown["path"].to_numpy(dtype=str), shown["detail"].to_numpy(dtype=str)
    if not config.keep_paths:
        table = p.manifest_table()
        paths, details = pathkeys.keys(table, paths), pathkeys.scrub_details(table, details)
    rows = [
        {"path": str(a), "reason": str(b), "detail": str(c)}
        for a, b, c in zip(paths, shown["reason"], details, strict=True)
    ]
    more = (
        f"; first {QUARANTINE_ROWS_SHOWN:,} shown, all in {summary.store}.quarantine.csv"
        if len(q) > QUARANTINE_ROWS_SHOWN
        else ""
    )
    create_table_artifact(
        rows,
        key=f"ingest-quarantine-{slug}",
        description=f"{len(q):,} files set aside by this run{more} (`ich quarantine {summary.store}`)",
    )
    return markdown


# ----------------------------------------------------------------------------------------------- flow


@flow(name="ingest", log_prints=False)
def ingest(
    source: str,
    store: str,
    labels: str | None = None,
    workers: int | None = None,
    shard_size: int | None = None,
    overwrite: bool = False,
    parents: bool = False,
    keep_paths: bool = False,
    verify: bool = True,
    # A plain str, not Literal: Prefect builds a deployment's parameter schema from the source
    # without importing it, where `Literal` cannot be resolved; `_cluster_kind` checks the value.
    cluster: str = "local",
    jobs: int | None = None,
    queue: str | None = None,
    cores: int | None = None,
    memory: str | None = None,
    walltime: str | None = None,
) -> ConvertSummary:
    """Convert (or append) the DICOM folder `source` into the Zarr store `store`.

    The parameters are `ich convert`'s options (`ConvertConfig`'s fields, `ClusterConfig`'s flat beside
    them) but those of an existing Dask cluster (`scheduler`, `scheduler_file`, `insecure_scheduler`),
    which the operator who serves the deployment chooses (`flows.deploy.run_scheduler`): a Dask client
    runs what its scheduler sends, so a run's requester must not pick it; nor `oversubscribe`, the
    machine owner's call. Run as a deployment, every path must lie under the folders the
    operator allowed (`flows.deploy.run_roots`), checked before any file is opened. Returns the run's
    summary; the Markdown summary and the quarantine table are the run's artifacts. Without
    `keep_paths` neither they nor the logs name a file under `source`.

    Args:
        source: Folder of DICOM files, any tree (or a landing folder that keeps receiving studies).
        store: The Zarr store to create, or to append the new series to.
        labels: Label CSV in RSNA's `ID,Label` format; images without a row are stored as 255.
        workers: Processes of a local Dask cluster (default: one per core).
        shard_size: Slices per shard file (default: the store's, else `ichdata.store.DEFAULT_SHARD_SIZE`).
        overwrite: Replace a store made from another plan (another source or shard size).
        parents: Create the store's parent folders when they do not exist (under the allowed roots).
        keep_paths: Keep each file's path relative to `source` in the store; file names may carry
            patient names, so by default only the manifest beside the store keeps them.
        verify: Re-read the whole store after the run (turn off for frequent runs on a large store).
        cluster: Where the Dask workers run: `local` (this machine) or `slurm` (SLURM jobs).
        jobs: SLURM jobs to keep running, one worker per core each (default 1; `cluster="slurm"`).
        queue: SLURM partition of the worker jobs (default: the site's `jobqueue.slurm.queue`).
        cores: Cores per SLURM job (default: the site's `jobqueue.slurm.cores`).
        memory: Memory per SLURM job, e.g. `16GB` (default: the site's `jobqueue.slurm.memory`).
        walltime: Time limit per SLURM job, e.g. `04:00:00`; a job is replaced before it ends.
    """
    # Long: a flow's parameters are its deployment's form, so each option is its own documented
    # argument; the stages themselves are the five task calls below.
    started = time.perf_counter()
    roots = _run_roots()
    scheduler, scheduler_file, insecure_scheduler = run_scheduler()
    config = ConvertConfig(
        source=_path("source", source, "a folder of DICOM files", roots),
        store=_path("store", store, "the path of the Zarr store to write", roots, store=True),
        labels=_path("labels", labels, "a label CSV", roots) if labels is not None else None,
        shard_size=shard_size,
        overwrite=overwrite,
        parents=parents,
        keep_paths=keep_paths,
        cluster=ClusterConfig(
            kind=_cluster_kind(cluster),
            workers=workers,
            scheduler=scheduler,
            scheduler_file=scheduler_file,
            insecure_scheduler=insecure_scheduler,
            jobs=jobs,
            queue=queue,
            cores=cores,
            memory=memory,
            walltime=walltime,
        ),
    )
    if parents:
        from ichdata.convert import check_and_make_parents

        # As `ich convert --parents`: the inputs checked first, the folders made before the lock, whose
        # file lives in them.
        check_and_make_parents(config)
    stages: dict[str, float] = {}
    verified: VerifyReport | None = None
    verify_error: str | None = None
    # One writer per store (`ichdata.lock`), from the checks of the scan stage to the verification.
    with store_lock(config.store, command="Prefect flow ingest"), cluster_client(config.cluster) as client:
        t = time.perf_counter()
        manifest = scan_task(config, client)
        stages["scan"] = time.perf_counter() - t
        t = time.perf_counter()
        p = plan_task(config, manifest)
        stages["plan"] = time.perf_counter() - t
        t = time.perf_counter()
        timeout = _scaled_timeout(p.n_new, _CONVERT_S_PER_SLICE, client)
        result = convert_task.with_options(timeout_seconds=timeout)(p, client)
        stages["convert"] = time.perf_counter() - t
        t = time.perf_counter()
        summary = finalize_task(result, config, started)
        stages["finalize"] = time.perf_counter() - t
        if verify:
            t = time.perf_counter()
            timeout = _scaled_timeout(summary.n_slices, _VERIFY_S_PER_SLICE, client)
            state = verify_task.with_options(timeout_seconds=timeout)(
                str(config.store), client, return_state=True
            )
            outcome = state.result(raise_on_failure=False)
            if isinstance(outcome, StoreInvalid):
                verify_error = str(outcome.report)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                verified = outcome
            stages["verify"] = time.perf_counter() - t
    summary.stages_s = stages
    report_task(summary, config, result.plan, verified, verify_error)
    if verify_error is not None:
        raise RuntimeError(f"the store failed verification: {verify_error}")
    return summary


__all__ = ["QUARANTINE_ROWS_SHOWN", "StoreInvalid", "ingest", "summary_markdown"]
