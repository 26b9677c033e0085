"""The Dask cluster a conversion runs on: this machine's cores, SLURM jobs, or an existing cluster.

`dask_client` is the one way `ich convert`, `ich verify` and the Prefect `ingest` flow get a
`distributed.Client`; `cluster_client` picks the route (local, SLURM through `ichdata.slurm`, or an
existing scheduler) from a `ichdata.config.ClusterConfig` after `check_cluster` has refused mistakes.
Nothing from distributed is imported until a cluster is asked for. Who may talk to the cluster (TLS
with the run's credentials, or the site's for an existing scheduler) is `ichdata.security`'s to say.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ichdata._kernels import warm_up  # Numba itself is imported on first use, not here
from ichdata.errors import UserError
from ichdata.security import existing_security, run_security, scheduler_http_options

if TYPE_CHECKING:
    from distributed import Client, LocalCluster
    from distributed.security import Security

    from ichdata.config import ClusterConfig

_log = logging.getLogger(__name__)

#: The client commands the SLURM route runs (dask-jobqueue submits with sbatch; we watch and cancel).
SLURM_COMMANDS = ("sbatch", "squeue", "scancel")
#: Files to read or slices to write that a conversion on this machine does in its own process:
#: starting a cluster (worker processes, TLS handshakes) and the compiled render kernels costs more
#: than that much work takes (bench/RESULTS.md, "Whole process").
SMALL_JOB = 1000


def usable_cpus() -> int:
    """Cores this process may run on (a batch job's allocation, not the whole node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | None, *, oversubscribe: bool = False) -> int:
    """The local cluster's worker processes: `workers`, at most the usable cores unless `oversubscribe`.

    More single-threaded workers than cores only add memory and start-up time; a capped request is
    logged as one warning line.
    """
    cores = usable_cpus()
    if workers is None:
        return cores
    if workers < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    if workers > cores and not oversubscribe:
        _log.warning(
            "--workers %d: this machine has %d usable cores; starting %d workers (--oversubscribe starts %d)",
            workers,
            cores,
            cores,
            workers,
        )
        return cores
    return workers


def check_cluster(config: ClusterConfig) -> None:
    """Refuse a mix of cluster options that cannot mean anything, in one line, before any work.

    SLURM's options only with `--cluster slurm`; `--cluster slurm` neither with an existing cluster
    nor with `--workers` (a job runs one worker per core), and only where SLURM's commands are on PATH.
    """
    given = ("jobs", "queue", "cores", "memory", "walltime")
    slurm_only = [name for name in given if getattr(config, name) is not None]
    if config.kind not in ("local", "slurm"):
        raise UserError(f"--cluster {config.kind}: expected local or slurm")
    existing = "--scheduler" if config.scheduler else "--scheduler-file" if config.scheduler_file else None
    if config.insecure_scheduler and not existing:
        raise UserError(
            "--insecure-scheduler: only with --scheduler or --scheduler-file (an existing cluster)"
        )
    if config.kind == "local":
        if slurm_only:
            raise UserError(f"--{slurm_only[0]}: only with --cluster slurm (Dask workers as SLURM jobs)")
        if existing and config.workers is not None:
            raise UserError(f"--workers and {existing}: give one, not both")
        if existing:
            existing_security(config.scheduler, config.scheduler_file, insecure=config.insecure_scheduler)
        return
    if existing:
        raise UserError(f"--cluster slurm and {existing}: give one, not both")
    if config.workers is not None:
        raise UserError(
            f"--workers {config.workers} and --cluster slurm: each SLURM job runs one worker per core; "
            "use --jobs and --cores"
        )
    for name in ("jobs", "cores"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: expected at least 1")
    missing = [name for name in SLURM_COMMANDS if shutil.which(name) is None]
    if missing:
        raise UserError(
            f"--cluster slurm: {', '.join(missing)} not found on PATH; run where SLURM's commands are "
            "(a login node), or without --cluster slurm"
        )


@contextlib.contextmanager
def cluster_client(config: ClusterConfig) -> Iterator[Client]:
    """A client of the cluster `config` names: SLURM jobs, an existing scheduler, or a local cluster.

    The options are checked first (`check_cluster`); a SLURM cluster keeps `config.jobs` jobs
    (default 1) and is gone, its jobs cancelled, when the block ends.
    """
    check_cluster(config)
    if config.kind == "slurm":
        from ichdata.slurm import slurm_cluster

        with (
            _quiet_distributed(),
            slurm_cluster(
                config.jobs if config.jobs is not None else 1,
                queue=config.queue,
                cores=config.cores,
                memory=config.memory,
                walltime=config.walltime,
            ) as client,
        ):
            yield client
        return
    with dask_client(
        config.workers,
        config.scheduler,
        config.scheduler_file,
        oversubscribe=config.oversubscribe,
        insecure_scheduler=config.insecure_scheduler,
    ) as client:
        yield client


class OnDemandClient:
    """The run's Dask client, started when a stage has enough work for it.

    A re-run that finds nothing new (the daily ingest of an unchanged landing folder) then starts no
    cluster at all, and neither does a job of at most `small_job` items while none is up
    (`in_process`). With `background`, `start()` starts the cluster in a thread of its own, so that
    the driver works on meanwhile (`ready` says when it is up); otherwise the first call starts it.
    The cluster is closed with `stack`, also when it was still starting, by the thread that started
    it (a distributed `Client` is left in the context it was entered in).
    """

    def __init__(
        self,
        start: Callable[[], contextlib.AbstractContextManager[Client]],
        stack: contextlib.ExitStack,
        *,
        small_job: int = 0,
        background: bool = False,
    ) -> None:
        self._start = start
        self._stack = stack
        self._small_job = small_job
        self._background = background
        self._client: Client | None = None
        self._thread: threading.Thread | None = None
        self._up = threading.Event()
        self._closing = threading.Event()
        self._error: BaseException | None = None

    def __call__(self) -> Client:
        """The client, its cluster started now (or waited for) if this is the first call."""
        if self._client is None:
            if self._thread is None:
                self._client = self._stack.enter_context(self._start())
            else:
                self._up.wait()
                if self._error is not None:
                    raise self._error
        assert self._client is not None
        return self._client

    def in_process(self, work: int) -> bool:
        """Whether `work` items (files, slices) are better done in this process: few, and no cluster up."""
        return self._client is None and self._thread is None and work <= self._small_job

    def start(self) -> None:
        """Start the cluster now, in the background where allowed (else as a call does)."""
        if self._client is not None or self._thread is not None:
            return
        if not self._background:
            self()
            return
        self._thread = threading.Thread(target=self._start_in_thread, name="ich-cluster-start", daemon=True)
        self._stack.callback(self._close)
        self._thread.start()

    @property
    def ready(self) -> bool:
        """Whether the cluster is up (or failed to start: the next call raises why)."""
        return self._client is not None or self._up.is_set()

    @property
    def started(self) -> bool:
        """Whether a stage has asked for the cluster."""
        return self._client is not None or self._thread is not None

    def _start_in_thread(self) -> None:
        try:
            with self._start() as client:
                self._client = client
                self._up.set()
                self._closing.wait()
        except BaseException as exc:  # handed to the driver: by its next call, or on closing
            self._error = exc
        finally:
            self._up.set()

    def _close(self) -> None:
        assert self._thread is not None
        self._closing.set()
        self._thread.join()
        if self._error is not None and self._client is not None:
            raise self._error  # the cluster failed while closing


def resolve_client(client: Client | OnDemandClient | None, work: int | None = None) -> Client | None:
    """`client` itself, or the started client of an `OnDemandClient` (call only when there is work).

    None, for the work to be done in this process, where `work` items are few enough
    (`OnDemandClient.in_process`).
    """
    if isinstance(client, OnDemandClient):
        return None if work is not None and client.in_process(work) else client()
    return client


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    *,
    oversubscribe: bool = False,
    insecure_scheduler: bool = False,
) -> Iterator[Client]:
    """A distributed `Client` of an existing cluster or of a new local one.

    An existing cluster is named by its `scheduler` address or its `scheduler_file`, and reached over
    TLS with the site's credentials (`existing_security`) unless `insecure_scheduler`. Otherwise a
    `LocalCluster` on 127.0.0.1 with `workers` processes (default and most, unless `oversubscribe`:
    one per usable core, `resolve_workers`) of one thread each, speaking TLS with credentials made
    for the run (`run_security`), without a dashboard (the scheduler's HTTP endpoint on a free
    loopback port, never 8787) and with distributed's log messages silenced while it runs.
    """
    if scheduler and scheduler_file:
        raise UserError("--scheduler and --scheduler-file: give one, not both")
    if scheduler or scheduler_file:
        security = existing_security(scheduler, scheduler_file, insecure=insecure_scheduler)
        with _existing_client(scheduler, scheduler_file, security) as client:
            yield client
        return
    n = resolve_workers(workers, oversubscribe=oversubscribe)
    from distributed import Client

    with _quiet_distributed(), _local_cluster(n) as cluster, Client(cluster) as client:
        yield client


#: How long a client waits for an existing scheduler.
CONNECT_TIMEOUT = "30s"


@contextlib.contextmanager
def _existing_client(
    scheduler: str | None, scheduler_file: str | os.PathLike[str] | None, security: Security | None
) -> Iterator[Client]:
    from distributed import Client

    try:
        client = Client(
            scheduler,
            scheduler_file=None if scheduler_file is None else str(scheduler_file),
            timeout=CONNECT_TIMEOUT,
            security=security,
        )
    except OSError as exc:
        raise UserError(f"--scheduler {scheduler or scheduler_file}: cannot connect ({exc})") from exc
    try:
        yield client
    finally:
        client.close()


# Batches of messages each comm and the scheduler keep for debugging (distributed's default: 1,000).
# Each batch holds the tasks it carried, shard arguments included: at RSNA's size the driver's memory
# climbed with every task sent until that cap.
_LOW_LEVEL_LOG_LENGTH = 16


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Silence distributed's logs while the block runs; log levels and settings are restored after it.

    INFO/WARNING chatter (and a heartbeat ERROR at shutdown) is noise for a user who asked for a
    conversion. The low-level logs (recent messages of each comm, the scheduler's transitions) are cut
    to a few entries: their default keeps the arguments of the last thousand task batches alive.
    """
    import dask

    names = (
        "distributed",
        "distributed.worker",
        "distributed.scheduler",
        "distributed.nanny",
        "distributed.core",
        "dask_jobqueue",
    )
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with dask.config.set({"distributed.admin.low-level-log-length": _LOW_LEVEL_LOG_LENGTH}):
            yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def _cluster_settings() -> dict[str, Any]:
    """The dask settings of our LocalCluster.

    Forked workers that inherit the warm render kernels, and none of the housekeeping that nobody reads on a
    cluster without a dashboard.
    """
    import dask

    settings: dict[str, Any] = {}
    if sys.platform == "linux" and dask.config.get("distributed.worker.multiprocessing-method") == "spawn":
        # Forked workers start far sooner than spawned ones (spawn re-imports distributed, pydicom and
        # zarr in each worker): most of a small incremental ingest. zarr and logging reset their locks
        # after a fork. A method the user configured is left alone.
        settings["distributed.worker.multiprocessing-method"] = "fork"
        # Import what the tasks use before forking, so that each worker inherits it instead of paying
        # for the imports on its first task.
        import numcodecs.zstd  # noqa: F401
        import zarr  # noqa: F401

        import ichdata.dicom  # noqa: F401

        # Numba's first call in a process (import, typing context, the disk cache) is paid here once;
        # the forked workers inherit the compiled render loop.
        warm_up()
    # Nobody looks at this cluster's diagnostics (it has no dashboard): no statistical profiler sampling
    # every task's stack in each worker, and slower housekeeping ticks: on a small machine every per
    # cent of a core the cluster spends on itself is taken from the conversion.
    settings["distributed.worker.profile.enabled"] = False
    settings["distributed.admin.tick.interval"] = "500ms"
    settings["distributed.admin.system-monitor.interval"] = "2s"
    settings["distributed.worker.memory.monitor-interval"] = "500ms"
    # Nothing for work stealing or the active memory manager to do: the driver keeps at most two tasks
    # per worker thread in flight, and no task's result stays on a worker. Off, they cost the scheduler
    # no CPU on a core the workers need.
    settings["distributed.scheduler.work-stealing"] = False
    settings["distributed.scheduler.active-memory-manager.start"] = False
    return settings


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Ignore SIGINT in this process while the block starts worker processes, which inherit that.

    Ctrl-C reaches the terminal's whole process group: the driver answers it in one line and closes
    the cluster; workers that also raised `KeyboardInterrupt` would each print a traceback. Only the
    main thread can change a signal's handler. Elsewhere (the background start of `OnDemandClient`, a
    Prefect task's thread) SIGINT is blocked in this thread instead: the threads it starts
    (distributed's event loop, which forks the workers) inherit the mask, and so do the workers, to
    which SIGINT is then never delivered.
    """
    if threading.current_thread() is not threading.main_thread():
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _shed_memory() -> None:
    """Hand memory this process freed back to the OS before its workers fork from it.

    A forked worker's resident set starts as its parent's: the label CSV of a large archive leaves
    hundreds of MB freed but kept by Arrow's memory pool and by malloc, which every worker would carry.
    """
    import gc

    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _local_cluster(n: int) -> Iterator[LocalCluster]:
    """A LocalCluster of `n` single-threaded worker processes on 127.0.0.1 behind TLS, without a dashboard.

    Its scheduler, workers and nannies speak TLS with this run's credentials (`run_security`), so no
    other process on the machine can connect to them and run code as the user.
    """
    import dask
    from distributed import LocalCluster

    _shed_memory()
    with dask.config.set(_cluster_settings()):
        with warnings.catch_warnings(), _workers_ignore_ctrl_c():
            # Python >= 3.12 warns about fork() in a process with threads (the cluster's event loop).
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*fork\(\).*")
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                # Any process on this machine can reach loopback: only peers holding this run's
                # credentials (held in memory, handed to the workers as they start) get past the TLS handshake.
                security=run_security(),
                protocol="tls://",
                dashboard_address=None,
                scheduler_kwargs=scheduler_http_options(),
                # CRITICAL: at shutdown a worker logs an ERROR for the heartbeat its closing scheduler
                # no longer answers. Task failures reach the driver as exceptions, named by shard.
                silence_logs=logging.CRITICAL,
            )
        with cluster:
            yield cluster


__all__ = [
    "CONNECT_TIMEOUT",
    "SLURM_COMMANDS",
    "SMALL_JOB",
    "OnDemandClient",
    "check_cluster",
    "cluster_client",
    "dask_client",
    "resolve_client",
    "resolve_workers",
    "usable_cpus",
]
