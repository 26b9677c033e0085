"""Deploying the flows: `ich serve` serves `ingest` as `ingest/default` and `train` as `train/default`.

`prefect.serve` registers the deployments with the Prefect API named by `PREFECT_API_URL` and then
polls it for runs, executing each in a subprocess of this process; `prefect.yaml` at the repo root is
the same deployments for a process work pool. The README says how runs are started.

The entrypoints are module paths (`flows.ingest.ingest`, `flows.train.train`), not file paths relative
to the current directory, so runs work wherever `ich serve` was started as long as `ich` is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ichdata.errors import UserError
from ichdata.options import option

#: The deployment name `ich serve` uses unless told otherwise: runs are `prefect deployment run 'ingest/default'`.
DEFAULT_DEPLOYMENT = "default"


def require_api_url() -> str:
    """The Prefect API URL this process talks to; `UserError` when none is configured or it does not answer.

    Without `PREFECT_API_URL`, Prefect falls back to a temporary server inside this process that
    nothing else can reach: `prefect deployment run` from another shell would never find the
    deployment. Serving only makes sense against a real server.
    """
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise UserError(
            "PREFECT_API_URL is not set: `ich serve` needs a Prefect server that `prefect deployment run` "
            "can reach too; start one with `prefect server start --host 127.0.0.1` and run "
            "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    from prefect import get_client

    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise UserError(
            f"PREFECT_API_URL {url}: the Prefect API does not answer ({type(failure).__name__}: {failure}); "
            "is `prefect server start --host 127.0.0.1` running?"
        )
    return str(url)


def serve(
    name: str = DEFAULT_DEPLOYMENT,
    *,
    parameters: dict[str, Any] | None = None,
    interval_s: float | None = None,
    limit: int = 1,
) -> None:
    """Serve `ingest/<name>` and `train/<name>` until interrupted (Ctrl-C or SIGTERM).

    `parameters` are the ingest deployment's defaults (e.g. a landing folder and its store; a run's
    `-p` values override them); `interval_s` adds a schedule that re-ingests every so many seconds,
    which is how a landing folder that keeps receiving studies is kept converted (each run appends
    only the new series). `limit` is the number of ingest runs executed at once: 1 by default,
    because two ingests into the same store must not run side by side. One training run at a time
    runs beside them (it holds the machine's GPU).
    """
    require_api_url()
    from prefect import serve as serve_deployments
    from prefect.deployments.runner import RunnerDeployment
    from prefect.types.entrypoint import EntrypointType

    from flows.ingest import ingest
    from flows.train import train

    # `to_deployment` returns a coroutine only when called from one; here it is the deployment
    ingest_deployment = ingest.to_deployment(
        name=name,
        parameters=parameters or {},
        interval=interval_s,
        concurrency_limit=limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    train_deployment = train.to_deployment(
        name=name, concurrency_limit=1, entrypoint_type=EntrypointType.MODULE_PATH
    )
    serve_deployments(
        cast(RunnerDeployment, ingest_deployment), cast(RunnerDeployment, train_deployment), limit=limit + 1
    )


__all__ = ["DEFAULT_DEPLOYMENT", "require_api_url", "serve"]


@dataclass(frozen=True)
class ServeConfig:
    """What `ich serve` was asked: the deployment's name, its runs' default parameters and schedule."""

    name: str = option(
        DEFAULT_DEPLOYMENT, help="deployment name (default: default → ingest/default, train/default)"
    )
    source: str | None = option(None, help="default `source` of runs: a DICOM folder or landing folder")
    store: str | None = option(None, help="default `store` of runs: the Zarr store to create or append to")
    labels: str | None = option(
        None, help="default `labels` of runs: the label CSV (stage_2_train.csv format)"
    )
    workers: int | None = option(None, help="default `workers` of runs: local Dask worker processes")
    interval: float | None = option(
        None,
        metavar="SECONDS",
        help="also ingest on this schedule (needs --source and --store): keeps a landing folder converted",
    )
    limit: int = option(1, help="ingest runs executed at once (default 1: one writer per store)")


def serve_from_config(config: ServeConfig) -> None:
    """Check `config` and `serve` it.

    Paths become absolute, since runs execute in subprocesses that need not share this directory.
    """
    defaults: dict[str, Any] = {
        k: str(Path(v).expanduser().absolute())
        for k, v in (("source", config.source), ("store", config.store), ("labels", config.labels))
        if v is not None
    }
    if config.workers is not None:
        defaults["workers"] = config.workers
    if config.interval is not None:
        if config.interval <= 0:
            raise UserError(f"--interval is {config.interval}; expected a positive number of seconds")
        if "source" not in defaults or "store" not in defaults:
            raise UserError("--interval needs --source and --store: a scheduled run has no one to pass them")
    if config.limit < 1:
        raise UserError(f"--limit is {config.limit}; expected at least 1 concurrent run")
    serve(config.name, parameters=defaults, interval_s=config.interval, limit=config.limit)
