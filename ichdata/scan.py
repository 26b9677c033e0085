"""The first pass of a conversion: a header-only scan of every file under the source, as a manifest.

`scan(source, client)` lists the source tree (files are recognised by content, never by name), then
reads the headers (`ichdata.dicom.read_header_layout`, which stops before the pixel data) on a Dask
cluster, in batches of files per task. Every file gets one manifest row: a slice (its image id,
study/series UID, position along the normal, …) or the reason it is set aside (`ichdata.reasons`).
A re-scan against the previous manifest (`previous=`) re-reads only new or changed files. The raw
(0010,0020) Patient ID stays in memory (column `patient_id`) for the plan to key; `Manifest.write`
never writes it.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ichdata.atomic import atomic_path
from ichdata.cluster import OnDemandClient, resolve_client
from ichdata.errors import UserError
from ichdata.paths import fs_path, path_text
from ichdata.reasons import KEPT_REASONS, Reason
from ichdata.store import read_manifest

if TYPE_CHECKING:
    from distributed import Client

#: Manifest columns as written to Parquet, in order. `reason` is "" for a usable slice.
#: `row` (the store row, -1 for a set-aside file) and the label columns are filled by the plan.
#: `pixel_layout` is where the pixel data lies and how it is encoded (`ichdata.dicom.read_header_layout`;
#: "" where only the full reader applies): the shard tasks read the pixels without parsing the header
#: again. Manifests written before it existed lack the column; their files are read in full.
#: `header_crc32` is the CRC-32 of the bytes before the file's Pixel Data tag
#: (`ichdata.dicom.identity`): with size and mtime, how a shard task recognises the file the scan read.
#: Manifests written before it existed lack it: size and mtime are checked alone for their rows.
COLUMNS: tuple[str, ...] = (
    "path",
    "size",
    "mtime_ns",
    "reason",
    "detail",
    "image_id",
    "study_uid",
    "series_uid",
    "patient_key",
    "slice_position",
    "instance_number",
    "rows",
    "cols",
    "pixel_layout",
    "header_crc32",
)


@dataclass
class Manifest:
    """One row per input file (`COLUMNS`, plus the transient `patient_id`), sorted by path.

    `source` is the root the relative POSIX `path`s start from.
    """

    source: Path
    table: pd.DataFrame
    #: The manifest beside the store that `ichdata.convert.scan_source` compared this scan against,
    #: handed on to the plan so that it is read once (a read costs time in proportion to the archive).
    previous: Manifest | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def n_slices(self) -> int:
        """Files whose header makes them a usable slice (a stored file with a report is one)."""
        r = self.table["reason"]
        return int(((r == "") | r.isin(KEPT_REASONS)).sum())

    def reasons(self) -> dict[str, int]:
        """Set-aside files by reason (header-time reasons only)."""
        r = self.table["reason"]
        r = r[(r != "") & ~r.isin(KEPT_REASONS)]
        return {str(k): int(v) for k, v in r.value_counts().sort_index().items()}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write as Parquet (atomically: a temporary file renamed over `path`), without raw patient ids."""
        p = Path(path)
        table = self.table.drop(columns=["patient_id"], errors="ignore")
        # Opened here, not by Arrow, which refuses a name the locale could not decode (`LC_ALL=C`).
        with atomic_path(p) as tmp, tmp.open("wb") as f:
            table.to_parquet(f, index=False)
        return p

    @classmethod
    def read(cls, path: str | os.PathLike[str], source: str | os.PathLike[str]) -> Manifest:
        """A manifest written by `write`, of the archive at `source` (raw patient ids are not kept)."""
        table = read_manifest(path)  # a damaged file is one line naming it
        table["patient_id"] = None
        if "header_crc32" not in table.columns:  # written by an earlier release: unknown
            table["header_crc32"] = pd.array([None] * len(table), dtype="Int64")
        return cls(Path(source), table)


def empty_table() -> pd.DataFrame:
    """A manifest table with no rows and the right dtypes."""
    return table_from_records([])


@dataclass
class SourceTree:
    """What `walk` found under a source: the regular files, and the entries that cannot be read as one.

    Paths are relative POSIX paths as text (`ichdata.paths.path_text`), sorted. Each odd entry is
    (path, reason, detail): a folder that cannot be listed, a link that loops or leads nowhere, a FIFO.
    """

    files: list[str]
    odd: list[tuple[str, Reason, str]]


#: Why an OS error makes a path unusable, by errno (anything else: `Reason.UNREADABLE_PATH`).
_ERRNO_REASONS = {
    errno.ELOOP: Reason.SYMLINK_LOOP,
    errno.ENAMETOOLONG: Reason.PATH_TOO_LONG,
    errno.ENOENT: Reason.DANGLING_SYMLINK,
}


def path_reason(exc: OSError, path: str) -> tuple[Reason, str]:
    """The set-aside reason and detail for an OS error met listing, statting or opening `path`."""
    reason = _ERRNO_REASONS.get(exc.errno or 0, Reason.UNREADABLE_PATH)
    what = exc.strerror or type(exc).__name__
    if reason is Reason.DANGLING_SYMLINK and not os.path.islink(path):
        return Reason.UNREADABLE_PATH, f"{what}: removed while the source was read"
    if reason is Reason.PATH_TOO_LONG:
        return reason, f"{what}: the path is longer than the OS opens; move the files up the tree"
    return reason, what


def _not_a_file(path: str) -> tuple[Reason, str]:
    """The reason for an entry that is neither a folder nor (after following links) a regular file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return path_reason(exc, path)
    if stat.S_ISDIR(st.st_mode):
        return Reason.NOT_A_FILE, (
            "a symbolic link to a folder; links to folders are not followed (they can make cycles): "
            "convert the folder itself"
        )
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else "a device"
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "not a regular file"
    )
    return Reason.NOT_A_FILE, f"{kind}; only regular files are read"


def walk(source: str | os.PathLike[str], exclude: Iterable[str | os.PathLike[str]] = ()) -> SourceTree:
    """Every entry under `source`, recursively: the regular files and the odd entries (`SourceTree`).

    Symbolic links to files are followed; links to folders are not (no cycles) and are reported with
    FIFOs, dangling links, link loops and folders that cannot be listed, so that every entry is
    accounted for. Paths in `exclude` (the store, its side files, the label CSV when they live under
    the source) and everything below them are skipped.
    """
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"SOURCE {root}: no such folder; expected a folder of DICOM files")
    skip = {os.path.realpath(p) for p in exclude}
    # Only an entry with the name of an excluded path, or a symbolic link, can resolve to one: the
    # others skip `realpath` (a few system calls per file, on the driver, for every file of the source).
    skip_names = {os.path.basename(p) for p in skip}
    files: list[str] = []
    odd: list[tuple[str, Reason, str]] = []
    # Relative paths by slicing, not `Path.relative_to` (far slower per file, on the driver).
    # scandir yields `d + os.sep + name`, so every entry's path starts with the root's `str` and a separator.
    top = str(root)
    cut = len(top) + (0 if top.endswith(os.sep) else 1)
    posix = os.sep == "/"

    def rel(path: str) -> str:
        r = path[cut:]
        return path_text(r if posix else r.replace(os.sep, "/"))

    stack = [top]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if (
                            skip
                            and (e.name in skip_names or e.is_symlink())
                            and os.path.realpath(e.path) in skip
                        ):
                            continue
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=True):
                            files.append(rel(e.path))
                        else:
                            odd.append((rel(e.path), *_not_a_file(e.path)))
                    except OSError as exc:  # a link that loops, or into a folder we cannot read
                        odd.append((rel(e.path), *path_reason(exc, e.path)))
        except OSError as exc:
            if d == top:
                raise UserError(f"SOURCE {root}: cannot be listed ({exc.strerror})") from None
            odd.append((rel(d), *path_reason(exc, d)))
    files.sort()
    odd.sort()
    return SourceTree(files, odd)


_RECORD = (*COLUMNS, "patient_id")


def scan_files(root: str, paths: Sequence[str]) -> pd.DataFrame:
    """Stat and read the header of each of `paths` (relative to `root`).

    The manifest rows of one batch, as a table (`table_from_records`), built here on the worker: the driver
    only concatenates the batches, instead of building the whole table while the workers wait for the plan.

    This is the Dask task of the scan; it never raises for a bad file.
    """
    from ichdata.dicom import SliceError, read_header_layout

    rows: list[tuple[Any, ...]] = []
    for rel in paths:
        full = os.path.join(root, fs_path(rel))
        size = mtime = None
        try:
            st = os.stat(full)
            size, mtime = st.st_size, st.st_mtime_ns
            m, layout, header_crc = read_header_layout(full)
        except SliceError as exc:
            rows.append((rel, size, mtime, exc.reason, exc.detail, *([None] * 10), None))
        except OSError as exc:  # listed, but it cannot be statted or opened (permissions, too long)
            rows.append((rel, size, mtime, *path_reason(exc, full), *([None] * 10), None))
        except Exception as exc:  # a file that breaks the reader must not stop 752k others
            rows.append(
                (rel, size, mtime, Reason.READ_ERROR, f"{type(exc).__name__}: {exc}", *([None] * 10), None)
            )
        else:
            rows.append(
                (
                    rel,
                    size,
                    mtime,
                    "",
                    "",
                    m.image_id,
                    m.study_uid,
                    m.series_uid,
                    None,
                    float(m.slice_position),
                    m.instance_number,
                    m.rows,
                    m.cols,
                    layout,
                    header_crc,
                    m.patient_id,
                )
            )
    return table_from_records(rows)


#: The manifest's text columns (`patient_id`, transient and never written, stays as it is).
_TEXT_COLUMNS = (
    "path",
    "reason",
    "detail",
    "image_id",
    "study_uid",
    "series_uid",
    "patient_key",
    "pixel_layout",
)


def table_from_records(records: Sequence[dict[str, Any] | tuple[Any, ...]]) -> pd.DataFrame:
    """A manifest table from dicts with (some of) `COLUMNS`, or from `scan_files` tuples.

    Missing values become null.
    """
    df = pd.DataFrame.from_records(list(records), columns=list(_RECORD))
    for c in (*_TEXT_COLUMNS, "patient_id"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    df["reason"] = df["reason"].fillna("")
    df["detail"] = df["detail"].fillna("")
    for c in ("size", "mtime_ns", "rows", "cols", "header_crc32"):
        df[c] = pd.array(df[c], dtype="Int64")
    df["instance_number"] = pd.array(df["instance_number"], dtype="Int64")
    df["slice_position"] = df["slice_position"].astype(np.float64)
    return df


#: Files per scan task at most (a fraction of a second of one worker).
MAX_BATCH = 2000


#: Files this process reads at a time while the cluster starts (it checks between two such runs).
_WHILE_STARTING = 64


def _batches(paths: Sequence[str], n_workers: int, batch_size: int | None) -> list[Sequence[str]]:
    """`paths` in consecutive batches, one scan task each.

    `batch_size` files each, or by default a number of batches that is a multiple of `n_workers` (so
    that equally fast workers finish together), at least 2 per worker and at most `MAX_BATCH` files
    (never fewer than 64) each. Two per worker: the cost per task (distributed's messaging in the
    driver, on a core the workers need, and in the worker between two tasks) stays small. A multiple
    of the workers: otherwise one of them can end a whole batch behind the others.
    """
    n = len(paths)
    if batch_size is None:
        w = max(1, n_workers)
        n_batches = max(2 * w, -(-n // MAX_BATCH))
        n_batches = -(-n_batches // w) * w
        batch_size = max(64, -(-n // n_batches))
    return [paths[i : i + batch_size] for i in range(0, n, batch_size)]


def scan(
    source: str | os.PathLike[str],
    client: Client | OnDemandClient | None = None,
    *,
    previous: Manifest | None = None,
    exclude: Iterable[str | os.PathLike[str]] = (),
    on_progress: Callable[[int], None] | None = None,
    batch_size: int | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Manifest:
    """Scan `source`: one manifest row per file (header only), in parallel on `client`'s cluster.

    Without a client the scan runs in this process; an `OnDemandClient` starts its cluster only when
    enough files need reading (a few are read here), and this process reads files while it starts.
    Files of `previous` (the manifest of an earlier
    scan of the same source) with unchanged size and modification time are not read again; their rows
    (with the plan's columns `row` and labels) are carried over. `on_progress(n)` is called as batches
    of `n` files finish (for a progress bar or a log line), `on_total(n)` once the tree is listed.
    """
    root = Path(source)
    tree = walk(root, exclude)
    paths = tree.files
    if on_total is not None:
        on_total(len(paths) + len(tree.odd))
    odd = _odd_rows(str(root), tree.odd)
    if on_progress is not None and len(odd):
        on_progress(len(odd))
    reused = pd.DataFrame()
    if previous is not None and len(previous.table):
        reused, unchanged = _unchanged(str(root), paths, previous.table)
        paths = [p for p, u in zip(paths, unchanged, strict=True) if not u]
        if on_progress is not None and len(reused):
            on_progress(len(reused))
    parts: list[pd.DataFrame] = []
    if paths and isinstance(client, OnDemandClient) and not client.in_process(len(paths)):
        # Files enough for a cluster: it starts in the background while this process reads the first
        # ones, a few at a time, until it is up.
        client.start()
        done = 0
        while done < len(paths) and not client.ready:
            head = paths[done : done + _WHILE_STARTING]
            parts.append(scan_files(str(root), head))
            done += len(head)
            if on_progress is not None:
                on_progress(len(head))
        paths = paths[done:]
    if paths:
        started = resolve_client(client, len(paths))
        n_workers = len(started.nthreads()) if started is not None else 1
        batches = _batches(paths, n_workers, batch_size)
        if started is None:
            for b in batches:
                parts.append(scan_files(str(root), b))
                if on_progress is not None:
                    on_progress(len(b))
        else:
            parts += _scan_on(started, str(root), batches, on_progress)
    # In batch order the scanned rows are already sorted by path (`walk` sorts); the sort below only
    # has work to do where rows of the previous manifest were reused.
    tables = [t for t in (reused, *parts, odd) if len(t)]
    table = pd.concat(tables, ignore_index=True) if tables else empty_table()
    if "patient_id" not in table.columns:
        table["patient_id"] = None
    # Text as Arrow-backed strings, as a manifest read from Parquet has them: a Python object per value
    # (several per file) held the driver's memory and made the plan's hashing and sorting slower per row.
    table = table.astype({c: "str" for c in _TEXT_COLUMNS})
    if not table["path"].is_monotonic_increasing:
        table = table.sort_values("path", kind="stable").reset_index(drop=True)
    return Manifest(root, table)


def _scan_on(
    client: Client, root: str, batches: list[Sequence[str]], on_progress: Callable[[int], None] | None
) -> list[pd.DataFrame]:
    """The `scan_files` tables of `batches`, in batch order, run on `client` a few tasks at a time.

    The paths travel inside the tasks: submitted all at once they are one graph of megabytes at RSNA's
    size, which distributed warns about on the user's terminal. Two tasks in flight per worker thread
    keep every worker busy, as the shard tasks do.
    """
    from distributed import as_completed

    limit = max(2, 2 * sum(client.nthreads().values()))
    done: list[pd.DataFrame | None] = [None] * len(batches)
    batch_of: dict[object, int] = {}
    # with_results: each batch's rows are fetched on the client's event loop as it finishes, not by one
    # blocking round trip per batch from this thread.
    ac = as_completed(with_results=True)

    def submit(i: int) -> None:
        fut = client.submit(scan_files, root, batches[i], pure=False)
        batch_of[fut.key] = i
        ac.add(fut)

    queued = iter(range(len(batches)))
    for i in itertools.islice(queued, limit):
        submit(i)
    for fut, part in ac:
        i = batch_of.pop(fut.key)
        done[i] = part
        if on_progress is not None:
            on_progress(len(batches[i]))
        fut.release()
        nxt = next(queued, None)
        if nxt is not None:
            submit(nxt)
    return [t for t in done if t is not None]


def _odd_rows(root: str, odd: list[tuple[str, Reason, str]]) -> pd.DataFrame:
    """The manifest rows of the entries `walk` could not list as regular files.

    Size and modification time are the entry's own (`lstat`), where it has any: a re-scan then finds
    it unchanged and does not report it again.
    """
    rows = []
    for rel, reason, detail in odd:
        size: int | None
        mtime: int | None
        try:
            st = os.lstat(os.path.join(root, fs_path(rel)))
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = None
        rows.append((rel, size, mtime, str(reason), detail, *([None] * 10), None))
    return table_from_records(rows)


def _unchanged(root: str, paths: list[str], previous: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows of `previous` whose file is unchanged, and for each of `paths` whether it is one of them.

    Unchanged: listed again, with the same size and modification time (both missing counts as the same),
    and not set aside for changing while it was converted (such a file is read again whatever its time).
    The rows keep the previous manifest's order.
    """
    size = np.full(len(paths), -1, dtype=np.int64)
    mtime = np.zeros(len(paths), dtype=np.int64)
    # `os.stat` on joined strings: a `Path` per file costs more than the system call on the driver.
    for k, p in enumerate(paths):
        try:
            st = os.stat(os.path.join(root, fs_path(p)))
        except OSError:
            continue
        size[k], mtime[k] = st.st_size, st.st_mtime_ns
    # Matched by Arrow's hash of the paths and compared as arrays (a pandas merge on three columns of
    # nullable types took longer than the system calls). A missing size or time matches a missing one.
    prev = previous.drop_duplicates("path", keep="last")
    prev = prev.loc[(prev["reason"] != Reason.CHANGED_DURING_CONVERSION).to_numpy()]
    same, at_np = index_in(paths, prev["path"])
    for now_v, col in ((size, "size"), (mtime, "mtime_ns")):
        was = prev[col]
        was_na = was.isna().to_numpy()[at_np]
        was_v = was.fillna(0).to_numpy(dtype=np.int64)[at_np]
        now_na = size < 0
        same = same & np.where(now_na | was_na, now_na & was_na, now_v == was_v)
    keep = np.zeros(len(prev), dtype=bool)
    keep[at_np[same]] = True
    return prev.loc[keep].reset_index(drop=True), same


def index_in(
    values: pd.Series | Sequence[str | None], among: pd.Series | Sequence[str | None]
) -> tuple[np.ndarray, np.ndarray]:
    """For each of the strings `values`, whether `among` holds it and its first position there (else 0).

    Hashed by Arrow, as `is_in`.
    """
    at = pc.index_in(_arrow_strings(values), value_set=_arrow_strings(among))
    found = ~np.asarray(at.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return found, np.asarray(at.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)


def is_in(values: pd.Series | Sequence[str | None], among: pd.Series | Sequence[str | None]) -> np.ndarray:
    """For each of the strings `values`, whether `among` holds it (a missing value matches a missing one).

    Hashed by Arrow: pandas' `isin` on Arrow-backed strings (what a Parquet manifest reads as) builds a
    Python object per value looked up.
    """
    v, a = (_arrow_strings(x) for x in (values, among))
    return pc.is_in(v, value_set=a).fill_null(False).to_numpy(zero_copy_only=False)


def _arrow_strings(x: pd.Series | Sequence[str | None]) -> pa.Array:
    arr = pa.array(x, type=pa.large_string(), from_pandas=True)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


__all__ = [
    "COLUMNS",
    "Manifest",
    "SourceTree",
    "is_in",
    "path_reason",
    "scan",
    "scan_files",
    "table_from_records",
    "walk",
]
