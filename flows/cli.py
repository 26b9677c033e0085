"""Parsers and handlers of this stage's `ich` subcommands. Imports nothing heavy at module level.

`ich serve` serves the Prefect `ingest` flow as the deployment `ingest/default` (see `flows.deploy`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ichdata.errors import UserError


def _serve(a: argparse.Namespace) -> int:
    from flows.deploy import serve

    # Paths are made absolute here: runs execute in subprocesses that need not share this directory.
    defaults: dict[str, Any] = {
        k: str(Path(v).expanduser().absolute())
        for k, v in (("source", a.source), ("store", a.store), ("labels", a.labels))
        if v is not None
    }
    if a.workers is not None:
        defaults["workers"] = a.workers
    if a.interval is not None:
        if a.interval <= 0:
            raise UserError(f"--interval is {a.interval}; expected a positive number of seconds")
        if "source" not in defaults or "store" not in defaults:
            raise UserError("--interval needs --source and --store: a scheduled run has no one to pass them")
    if a.limit < 1:
        raise UserError(f"--limit is {a.limit}; expected at least 1 concurrent run")
    serve(a.name, parameters=defaults, interval_s=a.interval, limit=a.limit)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the Prefect `ingest` flow as deployment ingest/default (needs PREFECT_API_URL)",
        description=(
            "Register the deployment `ingest/NAME` with the Prefect server at PREFECT_API_URL and run "
            "what it is asked to, until Ctrl-C. Start a run from any shell with "
            "`prefect deployment run 'ingest/default' -p source=DICOM_DIR -p store=STORE.zarr "
            "[-p labels=CSV] [-p workers=N | -p scheduler=tcp://HOST:8786]`."
        ),
    )
    p.add_argument("--name", default="default", help="deployment name (default: default → ingest/default)")
    p.add_argument("--source", help="default `source` of runs: a DICOM folder or landing folder")
    p.add_argument("--store", help="default `store` of runs: the Zarr store to create or append to")
    p.add_argument("--labels", help="default `labels` of runs: the label CSV (stage_2_train.csv format)")
    p.add_argument("--workers", type=int, help="default `workers` of runs: local Dask worker processes")
    p.add_argument(
        "--interval",
        type=float,
        metavar="SECONDS",
        help="also ingest on this schedule (needs --source and --store): keeps a landing folder converted",
    )
    p.add_argument(
        "--limit", type=int, default=1, help="runs executed at once (default 1: one writer per store)"
    )
    p.set_defaults(handler=_serve)


def _demo(a: argparse.Namespace) -> int:
    from flows.demo import main_demo

    return main_demo(a)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "demo",
        help="the whole system on a synthetic archive: ingest flow -> Dask conversion -> CNN and CNN-GRU -> report",
        description=(
            "Write a synthetic head-CT archive, ingest it with the Prefect `ingest` flow (ephemeral mode, "
            "Prefect home DIR/prefect, no server), train a CNN-only and a CNN-GRU model briefly on the CPU, "
            "evaluate both on the held-out patients and write DIR/report.md. Nothing is downloaded."
        ),
    )
    p.add_argument(
        "--out", type=Path, default=Path("ich-demo"), metavar="DIR", help="folder to write (ich-demo)"
    )
    p.add_argument("--studies", type=int, default=None, help="synthetic studies (default 60; --quick 8)")
    p.add_argument(
        "--epochs", type=int, default=None, help="training epochs per model (default 4; --quick 1)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="rows/columns of the synthetic DICOM slices (256; --quick 128)",
    )
    p.add_argument("--backbone", default=None, help="timm backbone of both models (test_resnet)")
    p.add_argument("--workers", type=int, default=None, help="Dask worker processes (default: one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the archive, the split and the training")
    p.add_argument(
        "--quick", action="store_true", help="a reduced run (about a minute) to check that all works"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_demo)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this stage's commands on the `ich` parser."""
    _add_serve(sub)
    _add_demo(sub)
