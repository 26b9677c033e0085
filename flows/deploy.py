"""Deploying the flows: `ich serve` serves `ingest/default`, `pull/default` and `train/default`.

`prefect.serve` registers the deployments with the Prefect API named by `PREFECT_API_URL` and then
polls it for runs, executing each in a subprocess of this process; `prefect.yaml` at the repo root is
the same deployments for a process work pool. The README says how runs are started.

Whoever reaches the Prefect API can start runs with parameters of their choosing, so what a run may
touch is the operator's decision, made when serving and handed to the runs in their environment
(which a run's parameters cannot change; a work pool's job variables set the same variables):
- the folders a run's paths must lie under, `ich serve --allow-root DIR` (`ICH_ALLOWED_ROOTS`, checked
  by `allowed_path` whenever the flow runs as a deployment, or wherever that variable is set);
- the DICOMweb archives the `pull` flow may fetch from, `ich serve --allow-archive URL`
  (`ICH_ALLOWED_ARCHIVES`, checked by `allowed_archive`): a run's URL receives the serving user's
  DICOMweb credentials, so it is the operator's choice, never any URL a caller names;
- an existing Dask cluster for the runs, `ich serve --scheduler/--scheduler-file` (dask config keys
  `ich.scheduler`, `ich.scheduler-file`, `ich.insecure-scheduler`, so a site's dask config may name it
  too): never a run parameter, since a Dask client runs what its scheduler sends.

The entrypoints are module paths (`flows.ingest.ingest`, `flows.pull.pull_flow`, `flows.train.train`),
not file paths relative to the current directory, so runs work wherever `ich serve` was started as
long as `ich` is installed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from ichdata.config import ClusterConfig
from ichdata.errors import UserError
from ichdata.options import option

#: The deployment name `ich serve` uses unless told otherwise: runs are `prefect deployment run 'ingest/default'`.
DEFAULT_DEPLOYMENT = "default"
#: The environment variable that names the folders a deployment run may use (`os.pathsep`-separated).
ROOTS_ENV = "ICH_ALLOWED_ROOTS"
#: The environment variable that names the DICOMweb archives a `pull` deployment run may fetch from.
ARCHIVES_ENV = "ICH_ALLOWED_ARCHIVES"
#: The `ClusterConfig` fields a run's parameters never set: an existing scheduler is the operator's (handed
#: to the runs in their environment), and so is running more workers than the machine has cores.
OPERATOR_ONLY = ("scheduler", "scheduler_file", "insecure_scheduler", "oversubscribe")
#: The dask config keys of the operator's existing Dask cluster for the runs (env: `DASK_ICH__SCHEDULER`, ...).
SCHEDULER_KEY, SCHEDULER_FILE_KEY, INSECURE_SCHEDULER_KEY = (
    "ich.scheduler",
    "ich.scheduler-file",
    "ich.insecure-scheduler",
)


def run_roots(as_deployment: bool) -> tuple[Path, ...] | None:
    """The folders a run's paths must lie under, resolved; None when the run's paths are not checked.

    Read from `ICH_ALLOWED_ROOTS` when called (never at import). A deployment run is always checked: a
    deployment served without roots gets none and refuses every path. A direct call from Python (the
    demo, tests: a trusted caller) is checked only where the variable is set.
    """
    text = os.environ.get(ROOTS_ENV)
    if text is None and not as_deployment:
        return None
    return tuple(Path(os.path.realpath(r)) for r in (text or "").split(os.pathsep) if r.strip())


def allowed_path(name: str, value: str, roots: tuple[Path, ...] | None, *, store: bool = False) -> Path:
    """Run parameter `name`'s path, resolved (links, `..`) and under one of `roots`, else a `UserError`.

    Nothing is opened: the refusal comes before any file is read or written. A `store` must lie inside
    a root, not be one (its side files are written beside it). With `roots` None the path is taken as
    given.
    """
    path = Path(value).expanduser()
    if roots is None:
        return path
    how = (
        "the operator who serves it names them (`ich serve --allow-root DIR`, or "
        f"{ROOTS_ENV} in a work pool's job variables)"
    )
    if not roots:
        raise UserError(f"parameter {name}: this deployment may use no folder: {how}")
    resolved = Path(os.path.realpath(path))
    if not any(resolved.is_relative_to(root) and not (store and resolved == root) for root in roots):
        raise UserError(
            f"parameter {name}: {value} is not inside a folder this deployment may use "
            f"({', '.join(map(str, roots))}); {how}"
        )
    return resolved


def run_archives(as_deployment: bool) -> tuple[str, ...] | None:
    """The DICOMweb archives a `pull` run may fetch from; None when the run's URL is not checked.

    Read from `ICH_ALLOWED_ARCHIVES` (archive URLs separated by whitespace) when called, as
    `run_roots` reads the roots: a deployment run is always checked, a direct call only where it is set.
    """
    text = os.environ.get(ARCHIVES_ENV)
    if text is None and not as_deployment:
        return None
    return tuple(_archive_root(u) for u in (text or "").split())


def _archive_root(url: str) -> str:
    """`url` without a trailing slash, its scheme and host in lower case (how URLs are compared)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def allowed_archive(name: str, value: str, archives: tuple[str, ...] | None) -> str:
    """Run parameter `name`'s DICOMweb URL when it is one of `archives` (or below one), else a `UserError`.

    The URL is where the run sends the serving user's DICOMweb credentials and what it fetches, so a
    caller of the API may only pick among the archives the operator named. A query string, a fragment
    or a `..` segment is refused outright. With `archives` None the URL is taken as given.
    """
    if archives is None:
        return value
    how = (
        "the operator who serves it names them (`ich serve --allow-archive URL`, or "
        f"{ARCHIVES_ENV} in a work pool's job variables)"
    )
    if not archives:
        raise UserError(f"parameter {name}: this deployment may pull from no archive: {how}")
    root = _archive_root(value)
    dots = ".." in root.split("/")
    if (
        dots
        or "?" in value
        or "#" in value
        or not any(root == a or root.startswith(a + "/") for a in archives)
    ):
        raise UserError(f"parameter {name}: {value} is not an archive this deployment may pull from; {how}")
    return value


def run_scheduler() -> tuple[str | None, Path | None, bool]:
    """The operator's existing Dask cluster for the runs: (address, scheduler file, insecure).

    From the dask config when called: `ich serve --scheduler ...` sets it in the runs' environment, a
    site may set it in its dask config files. (None, None, False): each run starts its own cluster.
    """
    import dask

    address = dask.config.get(SCHEDULER_KEY, None) or None
    file = dask.config.get(SCHEDULER_FILE_KEY, None) or None
    insecure = dask.config.get(INSECURE_SCHEDULER_KEY, False)
    return (
        None if address is None else str(address),
        None if file is None else Path(str(file)),
        insecure is True or str(insecure).lower() in ("1", "true", "yes"),
    )


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
            "can reach too; start one with `prefect server start --host 127.0.0.1` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api and its auth string in this shell's environment "
            "(the README's ingest section)"
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
    env: dict[str, str] | None = None,
) -> None:
    """Serve `ingest/<name>`, `pull/<name>` and `train/<name>` until interrupted (Ctrl-C or SIGTERM).

    `parameters` are the ingest deployment's defaults (e.g. a landing folder and its store; a run's
    `-p` values override them); `interval_s` adds a schedule that re-ingests every so many seconds,
    which is how a landing folder that keeps receiving studies is kept converted (each run appends
    only the new series). `limit` is the number of ingest runs executed at once: 1 by default,
    because two ingests into the same store must not run side by side. One training run at a time
    runs beside them (it holds the machine's GPU). `env` is set in this process's environment, which
    each run's subprocess inherits (the allowed roots, the operator's scheduler).
    """
    require_api_url()
    from prefect import serve as serve_deployments
    from prefect.deployments.runner import RunnerDeployment
    from prefect.types.entrypoint import EntrypointType

    from flows.ingest import ingest
    from flows.pull import pull_flow
    from flows.train import train

    os.environ.update(env or {})

    # `pull` shares the defaults that mean the same there (the store, labels, workers), not the schedule.
    shared = {k: v for k, v in (parameters or {}).items() if k in ("store", "labels", "workers")}
    deployments = [
        ingest.to_deployment(
            name=name,
            parameters=parameters or {},
            interval=interval_s,
            concurrency_limit=limit,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
        pull_flow.to_deployment(
            name=name, parameters=shared, concurrency_limit=limit, entrypoint_type=EntrypointType.MODULE_PATH
        ),
        train.to_deployment(name=name, concurrency_limit=1, entrypoint_type=EntrypointType.MODULE_PATH),
    ]
    # `to_deployment` is sync-compatible: called outside an event loop it returns the deployment itself.
    serve_deployments(*cast("list[RunnerDeployment]", deployments), limit=limit + 1)


__all__ = [
    "ARCHIVES_ENV",
    "DEFAULT_DEPLOYMENT",
    "INSECURE_SCHEDULER_KEY",
    "OPERATOR_ONLY",
    "ROOTS_ENV",
    "SCHEDULER_FILE_KEY",
    "SCHEDULER_KEY",
    "ServeConfig",
    "allowed_archive",
    "allowed_path",
    "require_api_url",
    "run_archives",
    "run_roots",
    "run_scheduler",
    "serve",
    "serve_from_config",
]


@dataclass(frozen=True)
class ServeConfig:
    """What `ich serve` was asked: the deployment's name, what its runs may use, their defaults and schedule."""

    name: str = option(
        DEFAULT_DEPLOYMENT, help="deployment name (default: default → ingest/default, train/default, …)"
    )
    allow_root: tuple[Path, ...] = option(
        (),
        metavar="DIR",
        help="a folder the runs may read and write (repeatable; needed): every path a run is given "
        "(source, store, labels) must lie under one",
    )
    allow_archive: tuple[str, ...] = option(
        (),
        metavar="URL",
        help="a DICOMweb archive the `pull` runs may fetch from, with the DICOMweb credentials of this "
        "process's environment (repeatable; without one, pull runs are refused)",
    )
    source: str | None = option(None, help="default `source` of runs: a DICOM folder or landing folder")
    store: str | None = option(None, help="default `store` of runs: the Zarr store to create or append to")
    labels: str | None = option(
        None, help="default `labels` of runs: the label CSV (stage_2_train.csv format)"
    )
    interval: float | None = option(
        None,
        metavar="SECONDS",
        help="also ingest on this schedule (needs --source and --store): keeps a landing folder converted",
    )
    limit: int = option(1, help="ingest runs executed at once (default 1: one writer per store)")
    # The runs' cluster: an existing scheduler goes to their environment (`run_scheduler`), the rest
    # become the runs' default parameters (`--cluster` as `cluster`).
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def serve_from_config(config: ServeConfig) -> None:
    """Check `config` and `serve` it.

    Paths become absolute, since runs execute in subprocesses that need not share this directory; the
    defaults must lie under the allowed roots, as every run's paths must.
    """
    if not config.allow_root:
        raise UserError(
            "--allow-root: none given; name the folders the runs may read and write, e.g. "
            "`ich serve --allow-root /data --allow-root /scratch`: anyone who reaches the Prefect API "
            "can start a run, and a run's paths outside them are refused"
        )
    for root in config.allow_root:
        if not Path(root).expanduser().is_dir():
            raise UserError(f"--allow-root {root}: no such folder")
    roots = tuple(Path(os.path.realpath(Path(r).expanduser())) for r in config.allow_root)
    env = {ROOTS_ENV: os.pathsep.join(map(str, roots))}
    for url in config.allow_archive:
        if not url.startswith(("http://", "https://")) or "?" in url or "#" in url:
            raise UserError(f"--allow-archive {url}: expected the http(s) URL of a DICOMweb service")
    env[ARCHIVES_ENV] = " ".join(_archive_root(u) for u in config.allow_archive)
    cluster = config.cluster
    if cluster.oversubscribe:
        raise UserError(
            "--oversubscribe: not for served runs; each run's local cluster has at most one worker per core"
        )
    if cluster.scheduler_file is not None:
        cluster = replace(cluster, scheduler_file=Path(cluster.scheduler_file).absolute())
    from ichdata.cluster import check_cluster

    check_cluster(cluster)
    if cluster.scheduler or cluster.scheduler_file:
        env.update(
            {
                _env_name(SCHEDULER_KEY): cluster.scheduler or "",
                _env_name(SCHEDULER_FILE_KEY): str(cluster.scheduler_file or ""),
                _env_name(INSECURE_SCHEDULER_KEY): str(cluster.insecure_scheduler),
            }
        )
    defaults: dict[str, Any] = {
        k: str(allowed_path(k, str(Path(v).expanduser().absolute()), roots, store=k == "store"))
        for k, v in (("source", config.source), ("store", config.store), ("labels", config.labels))
        if v is not None
    }
    for f in dataclasses.fields(cluster):
        value = getattr(cluster, f.name)
        if f.name not in OPERATOR_ONLY and value != f.default:
            defaults["cluster" if f.name == "kind" else f.name] = value
    if config.interval is not None:
        if config.interval <= 0:
            raise UserError(f"--interval is {config.interval}; expected a positive number of seconds")
        if "source" not in defaults or "store" not in defaults:
            raise UserError("--interval needs --source and --store: a scheduled run has no one to pass them")
    if config.limit < 1:
        raise UserError(f"--limit is {config.limit}; expected at least 1 concurrent run")
    serve(config.name, parameters=defaults, interval_s=config.interval, limit=config.limit, env=env)


def _env_name(key: str) -> str:
    """The environment variable dask reads `key` from (`ich.scheduler-file` → `DASK_ICH__SCHEDULER_FILE`)."""
    return "DASK_" + key.upper().replace(".", "__").replace("-", "_")
