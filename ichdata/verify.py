"""`ich verify`: re-read a whole store and check it against what the conversion recorded.

Each problem is one line naming the array, row, series, shard or file: checksums (every chunk of the
small arrays against its CRC-32C), structure (the store is complete, every array has one row per
slice, `study_offsets` agrees with `series/n_slices`, the `windows` attribute is this software's),
content (unique image ids, labels 0/1/255, every series in ascending slice position), pixels (every
shard decodes, each slice against its CRC-32C, and its CRC-32 equals the one its writer recorded in
`conversion/shard_done`), accounting (every row of the manifest beside the store is in `images` or in
the quarantine, at its row, with its labels and patient key; without `--keep-paths`, no file named in
the store; no file inside the store that no array accounts for: `ichdata.storefiles`) and the salt
beside the store (present where patient keys need it, well-formed, the one the keys were made with).
Notes say what is not wrong but weaker than it could be: a store of an earlier release whose arrays
carry no checksums.
"""

from __future__ import annotations

import functools
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ichdata import pathkeys
from ichdata.cluster import usable_cpus
from ichdata.config import ClusterConfig
from ichdata.options import option
from ichdata.reasons import KEPT_REASONS
from ichdata.resume import salt_check
from ichdata.shardfile import inner_checksum, read_shard, shard_checksum
from ichdata.store import (
    CLASSES,
    Store,
    array,
    base_attrs,
    check_small_arrays,
    manifest_path,
    open_group,
    open_store,
    read_manifest,
    salt_path,
)
from ichdata.storefiles import stray_files

if TYPE_CHECKING:
    from distributed import Client
    from zarr import Group

__all__ = ["VerifyConfig", "VerifyReport", "verify_store"]

_MAX_LISTED = 20  # per check: enough to act on, not a wall of text for a badly broken store


@dataclass(frozen=True)
class VerifyConfig:
    """What `ich verify` was asked to check, and on which cluster (none named: threads of this process)."""

    store: Path = option(help="the store to re-read (e.g. rsna.zarr)", metavar="STORE", positional=True)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def on_cluster(self) -> bool:
        """Whether a cluster option names a Dask cluster to re-read on (else threads of this process)."""
        c = self.cluster
        return bool(c.workers or c.scheduler or c.scheduler_file or c.kind == "slurm")


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
    notes: list[str] = field(default_factory=list)  # not wrong, weaker than it could be
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
        notes = "".join(f"\n  note: {n}" for n in self.notes)
        if self.ok:
            return f"{head}: OK{notes}"
        return (
            f"{head}: {len(self.problems)} problem(s)\n" + "\n".join(f"  {p}" for p in self.problems) + notes
        )


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
    t0 = time.perf_counter()
    path = Path(store)
    rep = VerifyReport(path)
    problems = rep.problems
    if (path / "zarr.json").is_file():
        # The small arrays first: a damaged one is listed (all of them), not the first one met.
        damaged = _array_problems(path, open_group(path), rep.notes)
        if damaged:
            problems.extend(damaged)
            rep.elapsed_s = time.perf_counter() - t0
            return rep
    s = open_store(path, allow_incomplete=True)
    if not s.complete:
        problems.append(f"state is {s.attrs.get('state')!r}, not 'complete': the conversion did not finish")
    n = s.n_slices
    rep.n_slices, rep.n_series, rep.n_quarantined = n, s.n_series, len(s.quarantine)
    group = open_group(path)

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
    ours = base_attrs()["windows"]
    if s.attrs.get("windows") != ours:
        problems.append(
            f"attribute windows is {s.attrs.get('windows')}, expected this ich's "
            + ", ".join(f"{w['name']} {w['level']:g}/{w['width']:g}" for w in ours)
        )
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
    markers = _markers(group, problems)
    if not inner_checksum(s.images):
        rep.notes.append(
            "images: its slices carry no checksum of their own (written by an earlier ich), so the "
            "training reader reads each shard whole once to check it; `ich convert --overwrite` re-converts "
            "the store with them"
        )
    shard = s.shard_size
    n_shards = -(-min(n, n_images) // shard)
    rep.n_shards = n_shards
    ranges = [(i, i * shard, min((i + 1) * shard, n, n_images)) for i in range(n_shards)]
    sums = _all_checksums(str(path), ranges, client)
    pix: list[str] = []
    for i, got in sums:
        marker = markers[i] if i < len(markers) else ""
        want = marker.split(":", 1)[1] if marker is not None and ":" in marker else None
        a, b = ranges[i][1], ranges[i][2]
        if got.startswith("error"):
            pix.append(f"shard {i} (rows {a}–{b - 1}): cannot be read: {got[7:]}")
        elif marker is None:
            pass  # its damaged done-marker is a problem already
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
        m = read_manifest(mp)
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
        acc.extend(_against_manifest(s, ok_rows, r_ok))
        set_aside = int((~s.quarantine["reason"].isin(KEPT_REASONS)).sum())  # the rest report stored files
        if len(m) != n + set_aside:
            acc.append(
                f"the manifest lists {len(m):,} input files; store + quarantine hold {n + set_aside:,}"
            )
        problems.extend(_limited(acc, "files"))

    # Files in the store that no array accounts for: a user's, a killed write's, a chunk past the end.
    problems.extend(_limited([f"{path / s.path}: {s.kind}" for s in stray_files(path)], "stray files"))
    problems.extend(_salt_problems(path, s))
    rep.elapsed_s = time.perf_counter() - t0
    return rep


def _array_problems(path: Path, group: Group, notes: list[str]) -> list[str]:
    """The damaged small arrays, a line each; those without checksums make one line of `notes`.

    Arrays with checksums are checked chunk by chunk (`check_small_arrays`); those without, from an
    earlier release, are decoded: a decoder's error is all there is to catch there.
    """
    damaged, unchecked = check_small_arrays(path, group)
    lines = [
        f"array {name}: {why}; `ich convert` with the same arguments rewrites it from the manifest"
        for name, why in damaged
    ]
    for name in unchecked:
        try:
            np.asarray(array(group, name)[...])
        except Exception as exc:
            lines.append(f"array {name}: cannot be decoded ({type(exc).__name__}); `ich convert` rewrites it")
    if unchecked:
        notes.append(
            f"arrays {', '.join(unchecked)} carry no checksum (written by an earlier ich): `ich convert` with "
            "the same arguments rewrites them with checksums"
        )
    return lines


def _markers(group: Group, problems: list[str]) -> list[str | None]:
    """Every done-marker ("" where none); a marker whose chunk is damaged is a problem, and None here."""
    if "conversion" not in group:
        return []
    arr = array(group, "conversion/shard_done")
    try:
        return [str(m) for m in np.asarray(arr[...])]
    except Exception:  # which ones: read them one by one
        out: list[str | None] = []
        bad: list[str] = []
        for i in range(arr.shape[0]):
            try:
                out.append(str(arr[i]))
            except Exception as exc:
                out.append(None)
                bad.append(
                    f"shard {i}: its done-marker (conversion/shard_done) is damaged ({type(exc).__name__})"
                )
        problems.extend(_limited(bad, "done-markers"))
        return out


def _against_manifest(s: Store, rows: pd.DataFrame, r: np.ndarray) -> list[str]:
    """Stored rows whose labels or patient key differ from what the manifest (the commit record) holds.

    `rows` are the manifest's rows of stored files, `r` their store rows (in range).
    """
    out: list[str] = []
    if all(c in rows.columns for c in CLASSES):
        want = rows[list(CLASSES)].to_numpy(dtype=np.int64)
        differ = np.flatnonzero((s.labels[r].astype(np.int64) != want).any(axis=1))
        out.extend(
            f"row {r[k]} ({s.image_id[r[k]]}): labels {s.labels[r[k]].tolist()} differ from the manifest's "
            f"{want[k].tolist()}"
            for k in differ
        )
    if "patient_key" in rows.columns:
        series_of = np.repeat(np.arange(s.n_series), s.series["n_slices"].to_numpy())
        if len(series_of) == s.n_slices:
            have = s.series["patient_key"].to_numpy(dtype=str)[series_of[r]]
            want_key = rows["patient_key"].to_numpy(dtype=str)
            for k in np.flatnonzero(have != want_key):
                out.append(
                    f"row {r[k]} ({s.image_id[r[k]]}): series {series_of[r[k]]} has another patient key than "
                    "the manifest records for it"
                )
    return out


_RSNA_KEY = re.compile(r"^ID_[0-9a-fA-F]+$")
_SALTED_KEY = re.compile(r"^P[0-9a-f]{16}$")


def _salt_problems(path: Path, s: Store) -> list[str]:
    """The salt beside the store: present where its keys need it, well-formed, and the one that made them.

    Keys are RSNA's `ID_…` patient ids kept as they are, or `P` + a salted hash (`ichdata.plan.patient_key`);
    the store records a check value of its salt (`salt_check`) to recognise it.
    """
    keys = s.series["patient_key"].astype(str)
    odd = keys[~keys.str.match(_RSNA_KEY) & ~keys.str.match(_SALTED_KEY)]
    out = [
        f"series {i}: patient key is neither an RSNA id nor a salted key (P + 16 hex digits)"
        for i in odd.index[:_MAX_LISTED]
    ]
    sp = salt_path(path)
    recorded = s.attrs.get("salt_check")
    needs_salt = bool(keys.str.match(_SALTED_KEY).any()) or recorded is not None
    if not sp.is_file():
        if needs_salt:
            out.append(
                f"{sp}: missing; the store's patient keys were made with it, so series appended later "
                "cannot be keyed consistently: put the salt file back beside the store"
            )
        return out
    try:
        salt = bytes.fromhex(sp.read_text().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        salt = b""
    if len(salt) != 16:
        out.append(f"{sp}: not a salt `ich convert` wrote (32 hexadecimal digits expected)")
    elif recorded is not None and recorded != salt_check(salt):
        out.append(
            f"{sp}: not the salt this store's patient keys were made with (the store's salt_check "
            "attribute differs): put the store's own salt file back"
        )
    return out
