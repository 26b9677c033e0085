"""ichdata: head-CT DICOM -> HU -> three windows -> a sharded Zarr v3 store, with Dask. No torch, no prefect.

Import from the module that does the job (`from ichdata.convert import convert`): reading `dicom`,
windows `windows`, slice order `order`, labels `labels`, set-aside reasons `reasons`, what a conversion
is asked `config` (`ConvertConfig`, `ClusterConfig`), the conversion's stages `scan` -> `plan` ->
`shards` -> `finalize` driven by `convert` on a `cluster` (local, an existing scheduler, or `slurm`;
who may talk to it `security`), the store `store` (ich's files in it `storefiles`, one
writer at a time `lock`, where outputs may go `outputs`), its check `verify`, a slice's picture
`preview`, synthetic archives `testing`. The store format is the README's "The store" section.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "atomic",
    "cluster",
    "config",
    "convert",
    "csvsafe",
    "dicom",
    "errors",
    "finalize",
    "labels",
    "lock",
    "options",
    "order",
    "outputs",
    "pathkeys",
    "paths",
    "plan",
    "preview",
    "reasons",
    "resume",
    "scan",
    "security",
    "setaside",
    "shardfile",
    "shards",
    "slurm",
    "store",
    "storefiles",
    "testing",
    "verify",
    "windows",
]
