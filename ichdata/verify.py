"""`ich verify`: re-read a whole store and check it against what the conversion recorded.

Each problem is one line naming the row, series, shard or file: structure (the store is complete,
every array has one row per slice, `study_offsets` agrees with `series/n_slices`), content (unique
image ids, labels 0/1/255, every series in ascending slice position), pixels (every shard decodes
and its CRC-32 equals the one its writer recorded in `conversion/shard_done`) and accounting (every
row of the manifest beside the store is in `images` or in the quarantine; without `--keep-paths`, no
file named in the store).
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ichdata import pathkeys
from ichdata.cluster import (
    oversubscribe_option,
    scheduler_file_option,
    scheduler_option,
    usable_cpus,
    workers_option,
)
from ichdata.options import option
from ichdata.reasons import KEPT_REASONS
from ichdata.shardfile import read_shard, shard_checksum
from ichdata.store import CLASSES, array, manifest_path, open_store

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["VerifyConfig", "VerifyReport", "verify_store"]

_MAX_LISTED = 20  # per check: enough to act on, not a wall of text for a badly broken store


@dataclass(frozen=True)
class VerifyConfig:
    """What `ich verify` was asked to check, and on which cluster (none: in this process)."""

    store: Path = option(help="the store to re-read (e.g. rsna.zarr)", metavar="STORE", positional=True)
    workers: int | None = workers_option()
    scheduler: str | None = scheduler_option()
    scheduler_file: Path | None = scheduler_file_option()
    oversubscribe: bool = oversubscribe_option()


@dataclass
class VerifyReport:
    """The result of `verify_store`: `ok` when `problems` is empty."""

    store: Path
    n_slices: int = 0
    n_series: int = 0
    n_quarantined: int = 0
    n_shards: int = 0
    n_manifest_rows: int = 0
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether verification found no problem."""
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"{self.store}: {self.n_slices:,} slices, {self.n_series:,} series, {self.n_quarantined:,} quarantined, "
            f"{self.n_shards:,} shards re-read in {self.elapsed_s:.1f} s"
        )
        if self.ok:
            return f"{head}: OK"
        return f"{head}: {len(self.problems)} problem(s)\n" + "\n".join(f"  {p}" for p in self.problems)


def _shard_checksums(store: str, ranges: list[tuple[int, int, int]]) -> list[tuple[int, str]]:
    """Re-read shards (index, start, stop) and return their checksums ("error: …" when unreadable)."""
    import zarr

    images = zarr.open_array(os.path.join(store, "images"), mode="r")
    out = []
    for i, a, b in ranges:
        try:
            out.append((i, shard_checksum(read_shard(images, a, b))))
        except Exception as exc:
            out.append((i, f"error: {type(exc).__name__}: {exc}"))
    return out


def _all_checksums(
    store: str, ranges: list[tuple[int, int, int]], client: Client | None
) -> list[tuple[int, str]]:
    """`_shard_checksums` of every range: on `client`'s cluster, else on a thread per usable core.

    Threads are enough in one process: reading, zstd and CRC-32 release the GIL.
    """
    n_parts = 8 * (len(client.nthreads()) if client is not None else usable_cpus())
    per = max(1, -(-len(ranges) // n_parts))
    parts = [ranges[k : k + per] for k in range(0, len(ranges), per)]
    if client is not None:
        futs = client.map(_shard_checksums, [store] * len(parts), parts)
        return [x for part in client.gather(futs) for x in part]
    if len(parts) <= 1:
        return _shard_checksums(store, ranges)
    with ThreadPoolExecutor(max_workers=usable_cpus(), thread_name_prefix="ich-verify") as pool:
        return [x for part in pool.map(functools.partial(_shard_checksums, store), parts) for x in part]


def _limited(lines: list[str], what: str) -> list[str]:
    if len(lines) <= _MAX_LISTED:
        return lines
    return [*lines[:_MAX_LISTED], f"… and {len(lines) - _MAX_LISTED} more {what}"]


def verify_store(store: str | os.PathLike[str], client: Client | None = None) -> VerifyReport:
    """Re-read everything in `store` and list what is wrong (see the module docstring).

    The pixel re-read runs on `client`'s Dask cluster when given, else in this process.
    """
    # Long: the checks run in the order a reader meets them and share the store's arrays.
    import zarr

    t0 = time.perf_counter()
    path = Path(store)
    rep = VerifyReport(path)
    s = open_store(path, allow_incomplete=True)
    problems = rep.problems
    if not s.complete:
        problems.append(f"state is {s.attrs.get('state')!r}, not 'complete': the conversion did not finish")
    n = s.n_slices
    rep.n_slices, rep.n_series, rep.n_quarantined = n, s.n_series, len(s.quarantine)
    group = zarr.open_group(str(path), mode="r")

    # Structure.
    n_images = int(s.images.shape[0])
    for name, length in (
        ("images", n_images),
        ("labels", len(s.labels)),
        ("slice_position", len(s.slice_position)),
        ("source_path", len(s.source_path)),
        ("study_offsets[-1]", int(s.study_offsets[-1]) if len(s.study_offsets) else -1),
    ):
        if length != n:
            problems.append(f"{name} has {length:,} rows, image_id has {n:,}")
    if s.attrs.get("n_slices") != n:
        problems.append(f"attribute n_slices is {s.attrs.get('n_slices')}, the store holds {n:,} image ids")
    if tuple(s.attrs.get("classes", ())) != CLASSES:
        problems.append(f"attribute classes is {s.attrs.get('classes')}, expected {list(CLASSES)}")
    off = s.study_offsets
    if len(off) != s.n_series + 1 or (len(off) and off[0] != 0) or np.any(np.diff(off) <= 0):
        problems.append(
            f"study_offsets ({len(off)} entries) do not rise strictly from 0 over {s.n_series} series"
        )
    elif not np.array_equal(np.diff(off), s.series["n_slices"].to_numpy()):
        bad = np.flatnonzero(np.diff(off) != s.series["n_slices"].to_numpy())
        problems.append(f"series/n_slices disagrees with study_offsets for series {bad[:10].tolist()}")
    else:
        # Order within each series.
        pos = s.slice_position
        if len(pos) == n:
            down = np.flatnonzero(np.diff(pos) < 0) + 1  # row r has a smaller position than row r-1
            starts = set(off[:-1].tolist())
            bad_rows = [int(r) for r in down if int(r) not in starts]
            problems.extend(
                _limited(
                    [
                        f"row {r} ({s.image_id[r] if r < len(s.image_id) else '?'}): slice position {pos[r]:g} "
                        f"< {pos[r - 1]:g} of the row before, in the same series"
                        for r in bad_rows
                    ],
                    "rows out of order",
                )
            )

    # Content.
    ids = pd.Series(s.image_id)
    dup = ids[ids.duplicated()]
    problems.extend(_limited([f"image id {i} appears more than once" for i in dup.unique()], "duplicate ids"))
    if s.attrs.get(pathkeys.ATTR) == pathkeys.MANIFEST_ROWS:  # converted without --keep-paths
        for name, held in (
            ("source_path", s.stored_source_path),
            ("quarantine/path", s.stored_quarantine["path"]),
        ):
            named = np.flatnonzero(~pathkeys.is_key(np.asarray(held, dtype=str)))
            problems.extend(
                _limited(
                    [
                        f"{name} row {r} names a file, not its manifest row, in a store without --keep-paths"
                        for r in named
                    ],
                    f"{name} rows",
                )
            )
    bad_labels = ~np.isin(s.labels, (0, 1, 255))
    if bad_labels.any():
        problems.append(
            f"labels hold values other than 0, 1, 255 in {int(bad_labels.any(axis=1).sum())} rows"
        )

    # Pixels.
    markers = (
        [str(m) for m in np.asarray(array(group, "conversion/shard_done")[...])]
        if "conversion" in group
        else []
    )
    shard = s.shard_size
    n_shards = -(-min(n, n_images) // shard)
    rep.n_shards = n_shards
    ranges = [(i, i * shard, min((i + 1) * shard, n, n_images)) for i in range(n_shards)]
    sums = _all_checksums(str(path), ranges, client)
    pix: list[str] = []
    for i, got in sums:
        want = markers[i].split(":", 1)[1] if i < len(markers) and ":" in markers[i] else None
        a, b = ranges[i][1], ranges[i][2]
        if got.startswith("error"):
            pix.append(f"shard {i} (rows {a}–{b - 1}): cannot be read: {got[7:]}")
        elif want is None:
            pix.append(f"shard {i} (rows {a}–{b - 1}): no checksum recorded (no done-marker)")
        elif got != want:
            pix.append(
                f"shard {i} (rows {a}–{b - 1}): checksum {got[:12]}… differs from the recorded {want[:12]}…"
            )
    problems.extend(_limited(pix, "shards"))

    # Accounting against the manifest.
    mp = manifest_path(path)
    if not mp.is_file() and not s.attrs.get("plan"):
        pass  # made by `write_store_from_arrays`, not from input files: nothing to account for
    elif not mp.is_file():
        problems.append(f"{mp}: missing, so the inputs cannot be accounted for")
    else:
        with mp.open("rb") as f:  # Arrow refuses a name the locale could not decode (`LC_ALL=C`)
            m = pd.read_parquet(f)
        rep.n_manifest_rows = len(m)
        acc: list[str] = []
        stored = m.loc[m["row"] >= 0]
        rows = stored["row"].to_numpy(dtype=np.int64)
        in_range = rows < n
        for p, r in zip(stored["path"][~in_range], rows[~in_range], strict=True):
            acc.append(f"{p}: manifest places it at row {r}, the store has {n:,} rows")
        ok_rows = stored.loc[in_range]
        r_ok = ok_rows["row"].to_numpy(dtype=np.int64)
        wrong = (s.source_path[r_ok] != ok_rows["path"].to_numpy(dtype=str)) | (
            s.image_id[r_ok] != ok_rows["image_id"].to_numpy(dtype=str)
        )
        for p, r in zip(ok_rows["path"][wrong], r_ok[wrong], strict=True):
            acc.append(
                f"{p}: manifest places it at row {r}, which holds {s.source_path[r]} ({s.image_id[r]})"
            )
        q_paths = set(s.quarantine["path"])
        lost = m.loc[(m["row"] < 0) & ~m["path"].isin(q_paths), "path"]
        acc.extend(f"{p}: in the manifest but neither in images nor in the quarantine" for p in lost)
        unlisted = set(s.source_path) - set(stored["path"])
        acc.extend(f"{p}: in images but not in the manifest" for p in sorted(unlisted))
        set_aside = int((~s.quarantine["reason"].isin(KEPT_REASONS)).sum())  # the rest report stored files
        if len(m) != n + set_aside:
            acc.append(
                f"the manifest lists {len(m):,} input files; store + quarantine hold {n + set_aside:,}"
            )
        problems.extend(_limited(acc, "files"))
    rep.elapsed_s = time.perf_counter() - t0
    return rep
