"""Parsers and handlers of `ich convert`, `ich verify` and `ich quarantine` (owned by the conversion stage).

Nothing heavy is imported at module level: `ich --help` stays fast and `ich convert` runs where only
`ichdata`'s dependencies are installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _convert(a: argparse.Namespace) -> int:
    from ichdata.convert import ConvertConfig, convert

    config = ConvertConfig(
        source=a.source,
        store=a.store,
        labels=a.labels,
        workers=a.workers,
        scheduler=a.scheduler,
        scheduler_file=a.scheduler_file,
        shard_size=a.shard_size,
        overwrite=a.overwrite,
    )
    summary = convert(config, progress=(not a.quiet and sys.stderr.isatty()) or a.progress)
    print(summary)
    return 0


def _verify(a: argparse.Namespace) -> int:
    from ichdata.verify import verify_store

    if a.workers or a.scheduler or a.scheduler_file:
        from ichdata.convert import dask_client

        with dask_client(a.workers, a.scheduler, a.scheduler_file) as client:
            report = verify_store(a.store, client=client)
    else:
        report = verify_store(a.store)
    print(report)
    return 0 if report.ok else 1


def _quarantine(a: argparse.Namespace) -> int:
    from ichdata.store import open_store

    store = open_store(a.store, allow_incomplete=True)
    q = store.quarantine
    if a.out is None:
        q.to_csv(sys.stdout, index=False)
    else:
        q.to_csv(a.out, index=False)
        print(f"wrote {len(q):,} rows to {a.out}", file=sys.stderr)
    return 0


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--workers", type=int, metavar="N", help="processes of a local Dask cluster (default: one per core)"
    )
    g.add_argument(
        "--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler (tcp://host:8786)"
    )
    g.add_argument(
        "--scheduler-file",
        type=Path,
        metavar="FILE",
        help="the file `dask scheduler --scheduler-file` writes",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the conversion commands on the `ich` parser."""
    p = sub.add_parser(
        "convert",
        help="convert a DICOM folder into a sharded Zarr v3 store (resumable, incremental)",
        description=(
            "Scan SOURCE (recursively, files recognised by content), order each series by slice position, "
            "render brain/subdural/bone windows at 256×256 and write them to STORE, on a local Dask cluster "
            "or an existing one. Files that are not usable slices are listed in the store's quarantine. "
            "Re-running resumes a killed run and appends studies added to SOURCE since."
        ),
    )
    p.add_argument("source", type=Path, metavar="SOURCE", help="folder of DICOM files (any tree)")
    p.add_argument("store", type=Path, metavar="STORE", help="the Zarr store to write (e.g. rsna.zarr)")
    p.add_argument(
        "--labels", type=Path, metavar="CSV", help="RSNA label CSV (ID,Label); images without a row get 255"
    )
    _add_cluster_options(p)
    p.add_argument(
        "--shard-size", type=int, metavar="K", help="slices per shard file (default: the store's, else 64)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a STORE made from a different plan")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress", action="store_true", help="progress bars even when stderr is not a terminal"
    )
    bar.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_convert)

    p = sub.add_parser(
        "verify",
        help="re-read a store: counts, order, shard checksums, every input file accounted for",
    )
    p.add_argument("store", type=Path, metavar="STORE")
    _add_cluster_options(p)
    p.set_defaults(handler=_verify)

    p = sub.add_parser("quarantine", help="the files a conversion set aside, with reasons, as CSV")
    p.add_argument("store", type=Path, metavar="STORE")
    p.add_argument("--out", type=Path, metavar="CSV", help="file to write (default: standard output)")
    p.set_defaults(handler=_quarantine)
