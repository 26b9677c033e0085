"""The Prefect `pull` flow: a DICOMweb archive's new studies → the landing folder → the store.

One task wraps `ichdata.pull.pull` (list, fetch what the landing folder lacks, publish whole studies);
then the `ingest` flow runs as a subflow on the landing folder, appending only the new series. So a
nightly `prefect deployment run 'pull/default'` (served by `ich serve` beside `ingest/default`) adds
the day's studies. The summary artifact counts the studies found, fetched, skipped and failed, and
names the failed ones by Study Instance UID (never a patient's name or ID, nor a file name). The
archive's credentials come from the environment of the process that runs the flow, or its
`~/.netrc`; they are never a parameter. Studies that failed fail the run, after the others are
ingested.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.deploy import allowed_archive, run_archives
from flows.ingest import _path, _run_roots, _slug, ingest
from ichdata.pull import ArchiveQuery, PullConfig, PullResult, pull

__all__ = ["pull_flow", "pull_markdown"]

_PULL_TIMEOUT_S = 12 * 3600.0  # a stalled archive ends the run; a large first pull takes hours, not days


@task(name="pull", timeout_seconds=_PULL_TIMEOUT_S, cache_policy=NO_CACHE, persist_result=False)
def pull_task(config: PullConfig) -> PullResult:
    """`ichdata.pull.pull`: one log line per study (by UID) and the summary.

    Not retried by Prefect: the pull retries each request itself, and a re-run fetches only what is
    missing.
    """
    logger = get_run_logger()
    result = pull(config, log=logger.info)
    logger.info("%s", result)
    return result


def pull_markdown(result: PullResult, url: str) -> str:
    """The Markdown of the summary artifact: the counts, then the failed studies and why."""
    lines = [
        f"# Pull from `{url}`",
        "",
        "| | |",
        "| --- | ---: |",
        f"| studies found | {result.found:,} |",
        f"| fetched | {result.fetched:,} |",
        f"| skipped (already complete) | {result.skipped:,} |",
        f"| failed | {len(result.failed):,} |",
        f"| left for a later run (limit) | {result.deferred:,} |",
        f"| instances fetched | {result.instances:,} |",
        f"| MB fetched | {result.bytes / 1e6:,.1f} |",
        f"| elapsed | {result.elapsed_s:.1f} s |",
        "",
        "## Failed studies",
        "",
    ]
    if result.failed:
        lines += ["| Study Instance UID | why |", "| --- | --- |"]
        lines += [f"| {uid} | {why} |" for uid, why in result.failed.items()]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _run_archives() -> tuple[str, ...] | None:
    """The archives this run may pull from (`flows.deploy.run_archives`); a deployment run always has some."""
    from prefect.runtime import deployment

    return run_archives(as_deployment=deployment.id is not None)


@flow(name="pull", log_prints=False)
def pull_flow(
    url: str,
    landing: str,
    store: str,
    study_date: str | None = None,
    modality: str = "CT",
    study: list[str] | None = None,
    limit: int | None = None,
    labels: str | None = None,
    workers: int | None = None,
    keep_paths: bool = False,
    verify: bool = True,
    ca_bundle: str | None = None,
    connections: int = 4,
    retries: int = 4,
) -> PullResult:
    """Pull the archive's new studies into `landing`, then ingest `landing` into `store`.

    Args:
        url: Root of the DICOMweb service, e.g. `https://pacs.example.org/dicom-web`.
        landing: Landing folder (created): one folder per complete study.
        store: The Zarr store to create, or to append the new series to.
        study_date: Studies of these dates: `YYYYMMDD`, `YYYYMMDD-YYYYMMDD`, `FROM-` or `-TO`.
        modality: Studies with series of this modality, and only those series.
        study: Only these Study Instance UIDs.
        limit: Fetch at most this many studies this run.
        labels: Label CSV in RSNA's `ID,Label` format for the ingest.
        workers: Processes of the ingest's local Dask cluster (default: one per core).
        keep_paths: Keep file paths in the store (see the `ingest` flow).
        verify: Re-read the whole store after the ingest.
        ca_bundle: CA certificates to verify https with (default: the system's).
        connections: Studies fetched at once.
        retries: Tries per request on network errors and 5xx answers.
    """
    roots = _run_roots()
    landing_path = _path("landing", landing, "the landing folder to pull into", roots, store=True)
    store_path = _path("store", store, "the path of the Zarr store to write", roots, store=True)
    labels_path = _path("labels", labels, "a label CSV", roots) if labels is not None else None
    config = PullConfig(
        url=allowed_archive("url", url, _run_archives()),
        landing=landing_path,
        connections=connections,
        retries=retries,
        query=ArchiveQuery(
            study_date=study_date,
            modality=modality,
            study=study,
            limit=limit,
            ca_bundle=_path("ca_bundle", ca_bundle, "a PEM file of CA certificates", roots)
            if ca_bundle
            else None,
        ),
    )
    result = pull_task(config)
    create_markdown_artifact(
        pull_markdown(result, config.url),
        key=f"pull-summary-{_slug(str(landing_path))}",
        description=str(result),
    )
    # Always: a no-op ingest is cheap, and it finishes one an earlier run left undone.
    ingest(
        source=str(landing_path),
        store=str(store_path),
        labels=None if labels_path is None else str(labels_path),
        workers=workers,
        keep_paths=keep_paths,
        verify=verify,
    )
    failures = result.failure_line()
    if failures is not None:
        raise RuntimeError(failures)
    return result
