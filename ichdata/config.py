"""What a conversion is asked to do, and on which Dask cluster: `ConvertConfig` and `ClusterConfig`.

The configuration has one home below every stage that reads it: `ichdata.convert` and its stages,
`ichdata.cluster` (which starts the cluster a `ClusterConfig` names), `ichdata.verify`, `ich predict`
and `ich serve` import it from here, and it imports none of them. Each field is declared once with
`ichdata.options.option`; the `ich` command line builds its options from these fields (`flows.cliparse`:
a `ClusterConfig` field becomes its own `--help` group, its flags unchanged) and the Prefect `ingest`
flow's parameters mirror them. Importing it costs nothing beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ichdata.options import option

#: The option group of the three ways to name a cluster: they exclude each other.
CLUSTER_GROUP = "cluster"
#: Where the Dask workers run when no existing cluster is named.
ClusterKind = Literal["local", "slurm"]


@dataclass(frozen=True)
class ClusterConfig:
    """The Dask cluster (local processes, SLURM jobs or an existing scheduler).

    Where the work runs. `ichdata.cluster.check_cluster` refuses the mixes that mean nothing;
    `cluster_client` starts it.
    """

    kind: ClusterKind = option(
        "local",
        flag="--cluster",
        help="where the Dask workers run: processes on this machine (local) or SLURM jobs (slurm)",
    )
    workers: int | None = option(
        None,
        help="processes of a local Dask cluster (default: one per core)",
        metavar="N",
        group=CLUSTER_GROUP,
    )
    scheduler: str | None = option(
        None,
        help="address of a running Dask scheduler (tcp://host:8786)",
        metavar="ADDRESS",
        group=CLUSTER_GROUP,
    )
    scheduler_file: Path | None = option(
        None, help="the file `dask scheduler --scheduler-file` writes", metavar="FILE", group=CLUSTER_GROUP
    )
    insecure_scheduler: bool = option(
        False,
        help="reach --scheduler/--scheduler-file over plain tcp, without the site's TLS credentials: "
        "whoever runs that scheduler runs code as you",
    )
    oversubscribe: bool = option(False, help="start --workers N even where N exceeds the usable cores")
    # SLURM's options (`ichdata.slurm`), each None: the site's dask config (jobqueue.slurm) decides.
    jobs: int | None = option(
        None, help="SLURM jobs to keep running, one Dask worker per core each (default: 1)", metavar="N"
    )
    queue: str | None = option(
        None,
        help="SLURM partition of the worker jobs (default: the site's jobqueue.slurm.queue)",
        metavar="NAME",
    )
    cores: int | None = option(
        None, help="cores per SLURM job (default: the site's jobqueue.slurm.cores)", metavar="N"
    )
    memory: str | None = option(
        None,
        help="memory per SLURM job, e.g. 16GB (default: the site's jobqueue.slurm.memory)",
        metavar="SIZE",
    )
    walltime: str | None = option(
        None,
        help="time limit per SLURM job, e.g. 04:00:00; a job is replaced before it ends "
        "(default: the site's jobqueue.slurm.walltime)",
        metavar="TIME",
    )


@dataclass(frozen=True)
class ConvertConfig:
    """What `ich convert` was asked to do (saved in the store's provenance; its paths only with `keep_paths`)."""

    source: Path = option(help="folder of DICOM files (any tree)", metavar="SOURCE", positional=True)
    store: Path = option(help="the Zarr store to write (e.g. rsna.zarr)", metavar="STORE", positional=True)
    labels: Path | None = option(
        None, help="RSNA label CSV (ID,Label); images without a row get 255", metavar="CSV"
    )
    # None: the existing store's, else store.DEFAULT_SHARD_SIZE
    shard_size: int | None = option(
        None, help="slices per shard file (default: the store's, else 64)", metavar="K"
    )
    overwrite: bool = option(
        False,
        help="replace a STORE made from a different plan (only what ich wrote: other files are refused)",
    )
    parents: bool = option(False, help="create STORE's parent folders when they do not exist")
    # Not part of the plan: each run writes the names of the whole store its own way (`ichdata.pathkeys`).
    keep_paths: bool = option(
        False,
        help="keep each file's path relative to SOURCE in the store (source_path, quarantine/path): "
        "file names may carry patient names",
    )
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


__all__ = ["CLUSTER_GROUP", "ClusterConfig", "ClusterKind", "ConvertConfig"]
