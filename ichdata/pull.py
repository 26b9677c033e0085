"""`ich pull URL LANDING`: the studies a DICOMweb archive lists, copied into a landing folder.

QIDO-RS lists the studies that match the filters (every page), then each study's series of the
modality and their instances; WADO-RS fetches what LANDING does not hold yet, in the transfer syntax
the archive stored (`ichdata.dicomweb`). Each study is fetched into the landing folder's hidden
incoming folder and moves into view only when whole (`ichdata.landing`), so `ich convert LANDING`
never meets half a study. A study whose fetch meets a network error or a 5xx answer is tried again
with back-off (`ichdata.dicomweb.Retry`), from the instances already written; one that still fails is
named at the end, and the others are kept. Studies are named by their Study Instance UID, the key the
store keeps too: never by a patient's name or ID, nor by a file name.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ichdata import landing as _landing
from ichdata.dicomweb import Archive, Retry, Transient, part_uids
from ichdata.errors import UserError
from ichdata.options import option

__all__ = ["ArchiveQuery", "PullConfig", "PullResult", "pull", "study_date_range"]

_DATE_RANGE = re.compile(r"(\d{8})?-(\d{8})?|\d{8}")


def study_date_range(value: str) -> str:
    """`--study-date` as QIDO-RS range matching: `YYYYMMDD`, `FROM-TO`, `FROM-` or `-TO`."""
    if not _DATE_RANGE.fullmatch(value) or value == "-":
        raise UserError(
            f"--study-date {value!r}: expected YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD"
        )
    for part in value.split("-"):
        if part:
            try:
                time.strptime(part, "%Y%m%d")
            except ValueError:
                raise UserError(f"--study-date {value!r}: {part} is not a date (YYYYMMDD)") from None
    return value


@dataclass(frozen=True)
class ArchiveQuery:
    """Which studies of a DICOMweb archive, and how to trust it.

    Options of `ich pull` (`PullConfig.query`, a group of its own in `--help`) and of `ich predict`.
    """

    study_date: str | None = option(
        None, metavar="FROM-TO", help="studies of these dates: YYYYMMDD, YYYYMMDD-YYYYMMDD, FROM- or -TO"
    )
    modality: str = option("CT", help="studies with series of this modality, and only those series (CT)")
    study: list[str] | None = option(None, metavar="UID", help="only this Study Instance UID (repeatable)")
    limit: int | None = option(
        None, metavar="N", help="fetch at most N studies this run (complete ones are skipped, not counted)"
    )
    ca_bundle: Path | None = option(
        None, metavar="PEM", help="CA certificates to verify https with (default: the system's)"
    )

    def filters(self) -> dict[str, str]:
        """The QIDO-RS study filters (without the `--study` UIDs, which are searched one by one).

        The modality is matched on each study's series, not with `ModalitiesInStudy`: Orthanc (1.10)
        applies that filter after a page's limit and offset, so every page after the first came back
        empty and studies were missed without a word.
        """
        out = {}
        if self.study_date:
            out["StudyDate"] = study_date_range(self.study_date)
        return out

    def check(self) -> None:
        """The checks made before any request, each a one-line `UserError`."""
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit}: expected at least 1 study")
        for uid in self.study or ():
            try:
                _landing.check_uid(uid, "--study")
            except ValueError as exc:
                raise UserError(str(exc)) from None
        self.filters()


@dataclass(frozen=True)
class PullConfig:
    """The options of `ich pull` besides the `ArchiveQuery` (which `query` holds)."""

    url: str = option(
        positional=True, metavar="URL", help="root of the DICOMweb service, e.g. https://pacs/dicom-web"
    )
    landing: Path = option(
        positional=True, metavar="LANDING", help="landing folder: one folder per complete study (created)"
    )
    connections: int = option(4, metavar="N", help="studies fetched at once (default 4)")
    retries: int = option(
        4, metavar="N", help="tries per request on network errors and 5xx answers (default 4)"
    )
    query: ArchiveQuery = field(default_factory=ArchiveQuery)

    def check(self) -> None:
        """The checks made before any request, each a one-line `UserError`."""
        self.query.check()
        if self.connections < 1:
            raise UserError(f"--connections {self.connections}: expected at least 1")
        if self.retries < 1:
            raise UserError(f"--retries {self.retries}: expected at least 1 try")
        if self.landing.exists() and not self.landing.is_dir():
            raise UserError(f"LANDING {self.landing}: is a file; expected a folder (created if missing)")


@dataclass
class PullResult:
    """What a pull found and did; `failed` maps a study's UID to why it failed."""

    landing: Path
    found: int = 0
    fetched: int = 0
    skipped: int = 0
    deferred: int = 0  # left for a later run by --limit
    failed: dict[str, str] = field(default_factory=dict)
    instances: int = 0
    bytes: int = 0
    elapsed_s: float = 0.0

    def __str__(self) -> str:
        later = f", {self.deferred} left for a later run (--limit)" if self.deferred else ""
        rate = self.instances / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (
            f"pulled {self.fetched} of {self.found} studies found ({self.skipped} already complete, "
            f"{len(self.failed)} failed{later}): {self.instances:,} instances, {self.bytes / 1e6:,.1f} MB "
            f"in {self.elapsed_s:.1f} s ({rate:,.0f} instances/s) -> {self.landing}"
        )

    def failure_line(self) -> str | None:
        """One line naming every study that failed and why, or None."""
        if not self.failed:
            return None
        named = "; ".join(f"{uid} ({why})" for uid, why in self.failed.items())
        return (
            f"{len(self.failed)} of {self.found} studies failed: {named}; the others are complete in "
            f"{self.landing}; run the same `ich pull` again to fetch what is missing"
        )


def _expected(archive: Archive, study_uid: str, modality: str | None, retry: Retry) -> dict[str, str]:
    """SOP Instance UID -> Series Instance UID of the study's series of `modality`, as QIDO-RS lists them."""
    expected = {}
    for series_uid in retry.call(lambda: archive.find_series(study_uid, modality)):
        for sop_uid in retry.call(partial(archive.find_instances, study_uid, series_uid)):
            expected[sop_uid] = series_uid
    return expected


def _fetch_missing(
    archive: Archive, landing: Path, study_uid: str, expected: dict[str, str], retry: Retry, count: list[int]
) -> None:
    """Fetch the instances of `expected` that LANDING lacks into the study's incoming folder.

    Adds the instances written and their bytes to `count[0]` and `count[1]`. A series with nothing held comes in one request, the rest of a
    part-held one instance by instance. A `Transient` failure is retried from what was written; one
    that outlasts `retry` is raised.
    """

    def fetch_series(series_uid: str) -> None:
        of_series = [sop for sop, s in expected.items() if s == series_uid]
        held = _landing.held_instances(landing, study_uid)
        missing = [sop for sop in of_series if sop not in held]
        wanted: list[str | None] = [None] if len(missing) == len(of_series) else list(missing)
        for sop in wanted if missing else []:
            for part in archive.retrieve(study_uid, series_uid, sop):
                got_study, got_series, got_sop = part_uids(part)
                if got_study != study_uid or got_series != series_uid:
                    raise Transient("the archive sent an instance of another series")
                _landing.write_instance(landing, study_uid, series_uid, got_sop, part)
                count[0], count[1] = count[0] + 1, count[1] + len(part)

    for series_uid in dict.fromkeys(expected.values()):
        seen = [count[0]]

        def progressed(seen: list[int] = seen) -> bool:
            moved = count[0] > seen[0]
            seen[0] = count[0]
            return moved

        retry.call(partial(fetch_series, series_uid), progressed=progressed)


def pull(
    config: PullConfig,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    retry: Retry | None = None,
) -> PullResult:
    """What `ich pull` runs: list, fetch, publish; returns the counts (failures in `result.failed`).

    `retry` defaults to `config.retries` tries with back-off from half a second. Raises `UserError`
    for what no retry fixes (bad credentials, a URL that is not DICOMweb, an archive that cannot be
    reached at all), before anything is written.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    config.check()
    retry = retry or Retry(attempts=config.retries)
    archive = Archive(config.url, ca_bundle=config.query.ca_bundle)
    landing = Path(config.landing)
    result = PullResult(landing=landing)
    try:
        if config.query.study:
            listed = [
                uid
                for study in dict.fromkeys(config.query.study)
                for uid in retry.call(
                    partial(archive.find_studies, {**config.query.filters(), "StudyInstanceUID": study})
                )
            ]
        else:
            listed = retry.call(lambda: archive.find_studies(config.query.filters()))
    except Transient as exc:
        raise UserError(
            f"{archive.url}: cannot be reached ({exc}) after {retry.attempts} tries; is the archive up and "
            "the URL right?"
        ) from None
    landing.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    started = [0]  # studies that needed a fetch, against --limit

    def one(study_uid: str) -> None:
        """List, fetch and publish one study, recording the outcome in `result`."""
        written = [0, 0]
        try:
            _landing.check_uid(study_uid, "Study Instance UID")
            expected = _expected(archive, study_uid, config.query.modality, retry)
            if not expected:
                return  # no series of the modality: not one of the studies asked for
            with lock:
                result.found += 1
            held = _landing.held_instances(landing, study_uid)
            if set(expected) <= held and _landing.publish(landing, study_uid, expected):
                with lock:
                    result.skipped += 1
                return
            with lock:
                if config.query.limit is not None and started[0] >= config.query.limit:
                    result.deferred += 1
                    return
                started[0] += 1

            _fetch_missing(archive, landing, study_uid, expected, retry, written)
            complete = _landing.publish(landing, study_uid, expected)
            reason = None if complete else "the archive sent fewer instances than it lists"
        except Transient as exc:
            complete, reason = False, f"{exc}, after {retry.attempts} tries"
        except (UserError, ValueError) as exc:
            complete, reason = False, str(exc)
        with lock:
            result.instances += written[0]
            result.bytes += written[1]
            if complete:
                result.fetched += 1
            else:
                result.failed[study_uid[:64]] = str(reason)
        if log is not None:
            log(f"study {study_uid}: " + (f"{written[0]} instances" if complete else f"failed: {reason}"))

    with (
        tqdm(total=len(listed), desc="pull", unit="study", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=config.connections, thread_name_prefix="ich-pull") as pool,
    ):
        for _ in pool.map(one, listed):
            bar.update()
    result.elapsed_s = time.perf_counter() - t0
    return result
