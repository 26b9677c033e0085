"""Dask workers as SLURM jobs: the `--cluster slurm` route of the conversion.

`slurm_cluster(jobs, ...)` yields a `distributed.Client` on a dask-jobqueue `SLURMCluster` that reads
the site's settings from dask's `jobqueue.slurm` config (`~/.config/dask/jobqueue.yaml` or
`DASK_JOBQUEUE__SLURM__*` variables), the keyword arguments overriding them. The scheduler speaks TLS
with credentials made for the run (DESIGN.md, Trust), keeps `jobs` jobs alive and cancels them when
the block ends, however it ends. Its command-line options are `ichdata.config.ClusterConfig`'s.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from ichdata.errors import UserError
from ichdata.security import run_security, scheduler_http_options

if TYPE_CHECKING:
    from dask_jobqueue import SLURMCluster
    from distributed import Client
    from distributed.security import Security

# A worker retires this long before its job's walltime (its tasks move to the others, and a
# replacement job is submitted), rather than being killed by SLURM in the middle of a shard.
_LIFETIME_MARGIN = 0.1
_LIFETIME_MARGIN_MIN_S = 60
# How long the end of the block waits for SLURM to see the run's jobs gone (a job step gets SIGTERM,
# then SIGKILL after the site's KillWait).
_CANCEL_WAIT_S = 60
# Once the first worker is up, how long to wait for the others before the work starts (their jobs
# may still be queued; the work is spread again as they join).
_GATHER_S = 30


@contextmanager
def slurm_cluster(
    jobs: int,
    *,
    queue: str | None = None,
    cores: int | None = None,
    memory: str | None = None,
    walltime: str | None = None,
) -> Iterator[Client]:
    """A Dask client whose workers run as `jobs` SLURM jobs, kept alive until the block ends.

    Each job runs one single-threaded worker process per core, sharing the job's memory. A job that
    SLURM kills, or whose worker retires before the walltime, is replaced by a new one. The
    scheduler accepts only peers holding this run's TLS credentials, which are written to the run's
    own private (0700) temporary folder in the site's `jobqueue.slurm.shared-temp-directory` (the home
    directory when unset), a file system the compute nodes share, and removed when the block ends,
    however it ends (`ich` raises on SIGTERM as on Ctrl-C).

    Args:
        jobs: The number of SLURM jobs (each one `sbatch` allocation) to keep running.
        queue: The partition (`#SBATCH -p`); the site's `jobqueue.slurm.queue` when None.
        cores: Cores per job; the site's `jobqueue.slurm.cores` when None.
        memory: Memory per job, e.g. `"16GB"`; the site's `jobqueue.slurm.memory` when None.
        walltime: Time limit per job, e.g. `"02:00:00"`; the site's `jobqueue.slurm.walltime` when None.

    Yields:
        A client connected to the cluster's scheduler.

    Raises:
        UserError: `jobs` is below 1, or cores or memory are given neither here nor in the site config.
    """
    import dask
    from distributed import Client

    cluster_class = _slurm_cluster_class()
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: at least one SLURM job is needed")
    cores = int(_per_job(cores, "cores"))
    memory = str(_per_job(memory, "memory"))
    walltime = walltime if walltime is not None else dask.config.get("jobqueue.slurm.walltime")
    worker_args = list(dask.config.get("jobqueue.slurm.worker-extra-args") or [])
    lifetime = _lifetime_s(walltime)
    if lifetime is not None:
        stagger = max(1, lifetime // 20)
        worker_args += ["--lifetime", f"{lifetime - stagger}s", "--lifetime-stagger", f"{stagger}s"]
    # A site's scheduler-options still win over ours (no dashboard, HTTP on loopback).
    scheduler_options = {
        **scheduler_http_options(),
        **(dask.config.get("jobqueue.slurm.scheduler-options") or {}),
    }
    job_name = f"ich-{uuid.uuid4().hex[:12]}"
    credentials: Path | None = None
    cluster: SLURMCluster | None = None
    client: Client | None = None
    try:
        credentials = Path(tempfile.mkdtemp(prefix=".ich-dask-tls-", dir=_shared_temp_directory()))
        security = _run_credentials(credentials)
        cluster = cluster_class(
            queue=queue,
            cores=cores,
            processes=cores,
            memory=memory,
            walltime=walltime,
            job_name=job_name,
            worker_extra_args=worker_args,
            security=security,
            protocol="tls://",
            scheduler_options=scheduler_options,
        )
        _test_submit(cluster.job_script())
        # Adaptive with a fixed size keeps `jobs` jobs: a job that ends is replaced.
        cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
        client = Client(cluster, security=security)
        # The first worker may wait in the queue as long as the site decides; the others get a while
        # longer, so that the work is not first cut for one job.
        client.wait_for_workers(1)
        with suppress(TimeoutError):
            client.wait_for_workers(jobs * cores, timeout=_GATHER_S)
        yield client
    finally:
        _shutdown(client, cluster, job_name)
        if credentials is not None:
            shutil.rmtree(credentials, ignore_errors=True)


def _slurm_cluster_class() -> type[SLURMCluster]:
    """dask-jobqueue's `SLURMCluster`, imported without the SIGINT handler its import installs.

    `dask_jobqueue.runner` replaces the process's SIGINT handler with `sys.exit()` when imported (meant
    for processes it starts itself): Ctrl-C while the run waits for its workers would end `ich`
    silently with status 0 instead of cancelling the jobs and saying so.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        from dask_jobqueue import SLURMCluster

        return SLURMCluster
    handler = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import SLURMCluster
    finally:
        signal.signal(signal.SIGINT, handler)
    return SLURMCluster


def _test_submit(script: str) -> None:
    """Refuse a worker job SLURM would refuse (no such partition, too much memory, too long), in one line.

    `sbatch --test-only` checks the job against the site's limits without submitting it; a job that
    can never start would otherwise leave the conversion waiting for workers for ever.
    """
    try:
        result = subprocess.run(
            ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"--cluster slurm: cannot run sbatch ({exc})") from exc
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit status {result.returncode}"
        raise UserError(f"--cluster slurm: SLURM refuses the worker job: {why}")


def _per_job(value: int | str | None, key: str) -> int | str:
    """The argument, else the site's `jobqueue.slurm.<key>`; a `UserError` naming both when neither is set."""
    import dask

    if value is None:
        value = dask.config.get(f"jobqueue.slurm.{key}")
    if value is None:
        raise UserError(
            f"SLURM cluster: no {key} per job: pass --{key} or set jobqueue.slurm.{key} in the dask "
            f"config (~/.config/dask/jobqueue.yaml or DASK_JOBQUEUE__SLURM__{key.upper()})"
        )
    return value


def _shutdown(client: Client | None, cluster: SLURMCluster | None, job_name: str) -> None:
    """Close the client and the cluster, cancel any job of this run SLURM still lists, wait for them.

    The `scancel` by name catches a job submitted while the cluster was closing, or left by an
    interrupted close; the name is unique to the run, so no other job is touched. Waiting until
    `squeue` no longer lists them means the caller returns with the jobs gone, not only asked to go.
    """
    try:
        if client is not None:
            with suppress(Exception):
                client.close()
        if cluster is not None:
            with suppress(Exception):
                cluster.close()
    finally:
        selector = [f"--name={job_name}", f"--user={os.environ.get('USER') or _user_name()}"]
        with suppress(OSError, subprocess.SubprocessError):
            _slurm_command(["scancel", *selector])
            deadline = time.monotonic() + _CANCEL_WAIT_S
            while _slurm_command(["squeue", "--noheader", *selector]).strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)


def _slurm_command(args: list[str]) -> str:
    """Run a SLURM client command and return its output (empty when it fails)."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    return result.stdout if result.returncode == 0 else ""


def _run_credentials(directory: Path) -> Security:
    """TLS credentials made for this run, as files in `directory` (0700) that the workers' jobs read.

    The credentials are `ichdata.security.run_security`'s, the local route's; the workers' jobs read
    them from files where the local cluster hands them over in memory.
    """
    from distributed.security import Security

    made = run_security().get_tls_config_for_role("worker")
    paths = {}
    for name, pem in (("ca", made["ca_file"]), ("cert", made["cert"]), ("key", made["key"])):
        path = directory / f"{name}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(str(pem))
        paths[name] = str(path)
    return Security(
        require_encryption=True,
        tls_ca_file=paths["ca"],
        **{
            f"tls_{role}_{kind}": paths[kind]
            for role in ("client", "scheduler", "worker")
            for kind in ("cert", "key")
        },
    )


def _shared_temp_directory() -> str:
    """The site's shared temp directory for worker credentials, or the home directory."""
    import dask

    configured = dask.config.get("jobqueue.slurm.shared-temp-directory")
    return os.path.expanduser(os.path.expandvars(configured or "~"))


def _lifetime_s(walltime: str | None) -> int | None:
    """The seconds a worker may live in a job of this walltime, leaving a margin; None without a limit.

    SLURM's forms: `minutes`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`.
    """
    if not walltime or walltime.upper() in {"INFINITE", "UNLIMITED"}:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", walltime.strip())
    if match is None:
        raise UserError(f"walltime {walltime!r}: expected SLURM's form, e.g. 02:00:00 or 1-00:00:00")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    assert first is not None
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = first * 3600 + (second or 0) * 60 + third
    elif second is not None:  # MM:SS
        seconds = first * 60 + second
    else:  # minutes
        seconds = first * 60
    margin = max(_LIFETIME_MARGIN_MIN_S, math.ceil(seconds * _LIFETIME_MARGIN))
    return max(seconds - margin, seconds // 2)


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


__all__ = ["slurm_cluster"]
