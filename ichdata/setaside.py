"""Which files a plan sets aside, and which stored files it reports: the plan's quarantine rows.

Files set aside at header or pixel time, repeated image ids (a `duplicate`, or a
`conflicting_duplicate` when the pixel data differ), new files of series already stored; and reports
on files that stay stored (`ichdata.reasons.KEPT_REASONS`): two slices at one position in a series,
a stored file edited since. `ichdata.plan` calls these; each returns rows of its quarantine table.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from ichdata.paths import fs_path
from ichdata.reasons import Reason
from ichdata.scan import index_in, is_in


def quarantine_row(path: str, reason: str, detail: str, size: object, mtime_ns: object) -> dict[str, Any]:
    """A new quarantine table row: the file, why it was set aside, and its size and mtime when read.

    `size` and `mtime_ns` are the scan's cells as they are (a NumPy integer, or missing).
    """
    return {"path": path, "reason": reason, "detail": detail, "size": size, "mtime_ns": mtime_ns, "new": True}


def header_and_pixel_failures(
    fresh: pd.DataFrame, pixel_failures: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """The files set aside at header time, and those an unfinished run found undecodable.

    Returns their quarantine rows and the remaining candidate slices, sorted by path. A file that
    failed at pixel time is set aside again only while its size and modification time are unchanged.
    """
    bad = fresh.loc[fresh["reason"] != ""]
    q_rows = [
        quarantine_row(p, r, d, s, m)
        for p, r, d, s, m in zip(
            bad["path"], bad["reason"], bad["detail"], bad["size"], bad["mtime_ns"], strict=True
        )
    ]
    cand = fresh.loc[fresh["reason"] == ""]
    failed = {f["path"]: f for f in pixel_failures}
    # Compared row by row only for the few candidates that failed: the resumed run of a killed
    # conversion plans every file of the archive.
    at = np.flatnonzero(is_in(cand["path"], list(failed)))
    named = cand.iloc[at]
    hit = np.array(
        [
            failed[p]["size"] == s and failed[p]["mtime_ns"] == m
            for p, s, m in zip(named["path"], named["size"], named["mtime_ns"], strict=True)
        ],
        dtype=bool,
    )
    for p, s, m in zip(
        named.loc[hit, "path"], named.loc[hit, "size"], named.loc[hit, "mtime_ns"], strict=True
    ):
        q_rows.append(quarantine_row(p, failed[p]["reason"], failed[p]["detail"], s, m))
    keep = np.ones(len(cand), dtype=bool)
    keep[at[hit]] = False
    cand = cand.loc[keep]
    return q_rows, cand.sort_values("path", kind="stable")


def duplicates(cand: pd.DataFrame, in_store: pd.DataFrame, root: str) -> tuple[pd.Series, pd.Series]:
    """For each candidate: the detail and reason of a repeated image id, else a null detail.

    An image id already in the store, or seen earlier by path in this scan, is a `duplicate` when the
    two files hold the same pixel data and a `conflicting_duplicate` when they do not (the first file
    stays stored either way; the detail names it).
    """
    kept = pd.concat(
        [in_store[["image_id", "path"]], cand[["image_id", "path"]].drop_duplicates("image_id")]
    ).drop_duplicates("image_id")
    kept_path = pd.Series(kept["path"].to_numpy(), index=kept["image_id"].to_numpy())
    is_dup = (
        is_in(cand["image_id"], in_store["image_id"]) | cand["image_id"].duplicated(keep="first").to_numpy()
    )
    detail = pd.Series([None] * len(cand), index=cand.index, dtype=object)
    reason = pd.Series(Reason.DUPLICATE, index=cand.index, dtype=object)
    dup_paths = cand["path"].to_numpy()[is_dup]
    dup_ids = cand["image_id"].to_numpy()[is_dup]
    digests = _pixel_digests(root, {*dup_paths, *(kept_path[i] for i in dup_ids)})
    for k, path, iid in zip(np.flatnonzero(is_dup), dup_paths, dup_ids, strict=True):
        first = kept_path[iid]
        a, b = digests.get(first), digests.get(path)
        if a is not None and b is not None and a != b:
            reason.iloc[k] = Reason.CONFLICTING_DUPLICATE
            detail.iloc[k] = (
                f"image id {iid} is already stored from {first}, with other pixel data: check which file "
                "is right (the one stored came first by path)"
            )
        else:
            detail.iloc[k] = f"image id {iid} is already stored from {first}"
    return detail, reason


def _pixel_digests(root: str, paths: set[str]) -> dict[str, str | None]:
    """A digest of each file's decoded pixel data (HU), None where it cannot be read.

    Decoded, not the raw bytes: the same image in two transfer syntaxes is the same image. Only the
    files that share an image id get here; they are read in threads (the reads wait on the disk).
    """
    if not paths:
        return {}
    from ichdata.dicom import read_slice

    def digest(path: str) -> str | None:
        try:
            hu, _ = read_slice(os.path.join(root, fs_path(path)))
        except Exception:  # a file that cannot be read cannot be compared: a plain duplicate
            return None
        h = hashlib.blake2b(str(hu.shape).encode(), digest_size=16)
        h.update(np.ascontiguousarray(hu).tobytes())
        return h.hexdigest()

    ordered = sorted(paths)
    with ThreadPoolExecutor(max_workers=min(8, len(ordered))) as pool:
        return dict(zip(ordered, pool.map(digest, ordered), strict=True))


def late_slices(cand: pd.DataFrame, in_store: pd.DataFrame) -> pd.Series:
    """For each candidate.

    The detail of its `series_in_store` reason (a new file of a series the store already holds: series stay
    contiguous, so it is reported, not spliced in), else null.
    """
    detail = pd.Series([None] * len(cand), index=cand.index, dtype=object)
    if not len(cand) or not len(in_store):
        return detail
    uids = in_store[["study_uid", "series_uid"]].drop_duplicates()
    stored_series = set(zip(uids["study_uid"], uids["series_uid"], strict=True))
    for k, (study, suid) in enumerate(zip(cand["study_uid"], cand["series_uid"], strict=True)):
        if (study, suid) in stored_series:
            detail.iloc[k] = (
                f"series {suid} is already in the store; pass --overwrite to re-convert it with this slice"
            )
    return detail


def set_aside(cand: pd.DataFrame, detail: pd.Series, reason: pd.Series) -> list[dict[str, Any]]:
    """The quarantine rows, with their `reason`, of the candidates whose `detail` is not null."""
    hit = detail.notna().to_numpy()
    sub = cand.loc[hit]
    return [
        quarantine_row(p, r, d, s, m)
        for p, r, d, s, m in zip(
            sub["path"], reason[hit], detail[hit], sub["size"], sub["mtime_ns"], strict=True
        )
    ]


#: Slices of one series closer than this along the normal (mm) are at the same position.
_SAME_POSITION_MM = 1e-3


def duplicate_positions(rows: pd.DataFrame, series: pd.DataFrame) -> list[dict[str, Any]]:
    """The `duplicate_position` reports: each stored slice at the position of the one before it in its series.

    Both stay stored (the report names the first of them); a row added by this run is a new report.
    """
    pos = rows["slice_position"].to_numpy(dtype=np.float64)
    series_of = np.repeat(np.arange(len(series)), series["n_slices"].to_numpy())
    same = np.zeros(len(rows), dtype=bool)
    same[1:] = (series_of[1:] == series_of[:-1]) & (np.abs(np.diff(pos)) <= _SAME_POSITION_MM)
    if not same.any():
        return []
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(rows))))
    path, uid = rows["path"].to_numpy(), series["series_uid"].to_numpy()
    out = []
    for k in np.flatnonzero(same):
        row = quarantine_row(
            path[k],
            Reason.DUPLICATE_POSITION,
            f"same slice position {pos[first[k]]:g} as {path[first[k]]} in series {uid[series_of[k]]}; "
            "both are stored",
            rows["size"].iloc[k],
            rows["mtime_ns"].iloc[k],
        )
        out.append({**row, "new": not bool(rows["existing"].iloc[k])})
    return out


def changed_since_conversion(in_store: pd.DataFrame, scanned: pd.DataFrame) -> list[dict[str, Any]]:
    """The `changed_since_conversion` reports: stored files whose size or modification time differ now.

    The store keeps the version it converted; the report is new unless the previous run made it too.
    """
    if not len(in_store):
        return []
    # Each stored file's scan row by Arrow's hash of the paths, compared as arrays (a pandas reindex on
    # string paths was most of a re-run's plan at RSNA's size).
    scan_rows = scanned.drop_duplicates("path", keep="last")
    differs, at_np = index_in(in_store["path"], scan_rows["path"])  # listed now, and where
    now: dict[str, np.ndarray] = {}
    changed = np.zeros(len(in_store), dtype=bool)
    for col in ("size", "mtime_ns"):
        was = in_store[col]
        now_col = scan_rows[col]
        now[col] = now_col.fillna(0).to_numpy(dtype=np.int64)[at_np]
        differs &= ~now_col.isna().to_numpy()[at_np]
        was_na = was.isna().to_numpy()
        changed |= ~was_na & (now[col] != was.fillna(0).to_numpy(dtype=np.int64))
    differs &= changed
    out = []
    for k in np.flatnonzero(differs):
        prev = in_store.iloc[k]
        when = datetime.fromtimestamp(int(now["mtime_ns"][k]) / 1e9, tz=UTC)
        detail = (
            f"changed since it was converted ({int(prev['size']):,} → {int(now['size'][k]):,} bytes, "
            f"modified {when:%Y-%m-%d %H:%M:%S} UTC); the store holds the version converted then: "
            "pass --overwrite to convert the source again"
        )
        row = quarantine_row(
            prev["path"], Reason.CHANGED_SINCE_CONVERSION, detail, prev["size"], prev["mtime_ns"]
        )
        out.append({**row, "new": prev.get("reason") != Reason.CHANGED_SINCE_CONVERSION})
    return out


__all__ = [
    "changed_since_conversion",
    "duplicate_positions",
    "duplicates",
    "header_and_pixel_failures",
    "late_slices",
    "quarantine_row",
    "set_aside",
]
