"""The plan of a conversion: which file goes to which store row and shard, and what is set aside.

`plan(manifest, store, labels=...)` turns a scan into a `Plan`: the store order (series contiguous and
in slice order, `ichdata.order.slice_order`), the shards and their keys (a hash of the plan settings
and of each row's path, size, modification time and image id: a shard's done-marker), the set-aside
files and the reports on stored files with their `ichdata.reasons.Reason` (`ichdata.setaside`), the
labels (255 where the CSV has no row) and each series' pseudonymous patient key. On a store an earlier run of the same plan made (`ichdata.resume`), the
plan starts from the manifest kept beside it: committed rows stay where they are, new series are
appended, and files set aside before are not reported again. The README's store section says what
users see of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichdata.errors import UserError
from ichdata.paths import fs_path
from ichdata.reasons import KEPT_REASONS, Reason
from ichdata.resume import load_salt, plan_config, previous_run, resolve_shard_size, stored_config
from ichdata.scan import Manifest, index_in, is_in
from ichdata.setaside import (
    changed_since_conversion,
    duplicate_positions,
    duplicates,
    header_and_pixel_failures,
    late_slices,
    set_aside,
)
from ichdata.store import CLASSES, IMAGE_SIZE, QUARANTINE_COLUMNS, UNLABELLED, manifest_path

_RSNA_PATIENT = re.compile(r"^ID_[0-9a-fA-F]+$")
#: A missing size, modification time or header CRC in `Plan._identities` (a time may be negative).
_UNKNOWN = int(np.iinfo(np.int64).min)
#: The columns of a plan's quarantine table: the store's, and what the plan needs to resume.
_QUARANTINE = [*QUARANTINE_COLUMNS, "size", "mtime_ns", "new"]


@dataclass(frozen=True)
class Plan:
    """What a conversion will write; see the module docstring.

    `rows` has one row per store row in store order (columns path, size, mtime_ns, image_id,
    slice_position, existing); `series` one row per series (study_uid, series_uid, patient_key,
    n_slices); `quarantine` every set-aside file and every report on a stored file
    (`ichdata.reasons.KEPT_REASONS`) (path, reason, detail, size, mtime_ns, new), `new` marking those
    this run added. `n_existing` rows are already committed in the store.
    `manifest` is the scan the plan came from (with the carried-over rows of the previous manifest).
    """

    store: Path
    source: Path
    shard_size: int
    image_size: int
    config: dict[str, Any]
    rows: pd.DataFrame
    series: pd.DataFrame
    labels: np.ndarray
    quarantine: pd.DataFrame
    n_existing: int
    manifest: Manifest
    labels_source: str | None = None
    overwrite: bool = False  # `convert_shards` replaces whatever is at `store` first
    # What the store records of `config`: the source folder as a keyed digest (`ichdata.resume`).
    store_config: dict[str, Any] = field(default_factory=dict)
    _keys: dict[int, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_slices(self) -> int:
        """Rows of `images` in the planned store."""
        return len(self.rows)

    @property
    def n_new(self) -> int:
        """Rows this run adds (not already in the store)."""
        return len(self.rows) - self.n_existing

    @property
    def n_shards(self) -> int:
        """Shards of `images` in the planned store (the last may be partial)."""
        return -(-self.n_slices // self.shard_size)

    @cached_property
    def study_offsets(self) -> np.ndarray:
        """The store's `study_offsets`: series s holds rows `[study_offsets[s], study_offsets[s+1])`."""
        return np.concatenate([[0], np.cumsum(self.series["n_slices"].to_numpy(dtype=np.int64))]).astype(
            np.int64
        )

    @cached_property
    def config_hash(self) -> str:
        """A digest of the plan settings, the part of every shard key shared by all shards."""
        return _digest(json.dumps(self.config, sort_keys=True))

    def shard_rows(self, i: int) -> tuple[int, int]:
        """Rows `[a, b)` of shard `i`."""
        a = i * self.shard_size
        return a, min(a + self.shard_size, self.n_slices)

    @cached_property
    def _row_text(self) -> list[str]:
        r = self.rows
        text = (
            r["path"].astype(str)
            + "\t"
            + r["size"].astype(str)
            + "\t"
            + r["mtime_ns"].astype(str)
            + "\t"
            + r["image_id"].astype(str)
        )
        return text.tolist()

    def shard_key(self, i: int) -> str:
        """The hash of the plan settings and of what shard `i` holds (its done-marker).

        For each row, path, size, modification time and image id.
        """
        if i not in self._keys:
            a, b = self.shard_rows(i)
            h = hashlib.blake2b(self.config_hash.encode(), digest_size=16)
            h.update(("\0" + "\0".join(self._row_text[a:b])).encode())
            self._keys[i] = h.hexdigest()
        return self._keys[i]

    @cached_property
    def plan_hash(self) -> str:
        """A hash of the whole plan (every shard key, the series and the labels)."""
        h = hashlib.blake2b(self.config_hash.encode(), digest_size=16)
        for i in range(self.n_shards):
            h.update(self.shard_key(i).encode())
        h.update(self.study_offsets.tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()

    @cached_property
    def _sources(self) -> list[str | None]:
        # One pass over the rows, not a pandas slice per shard: the driver submits thousands of shards.
        root = str(self.source)
        r = self.rows
        return [
            None if e else os.path.join(root, fs_path(p))
            for p, e in zip(r["path"], r["existing"], strict=True)
        ]

    def shard_sources(self, i: int) -> list[str | None]:
        """For each row of shard `i`: the absolute path to render, or None for a row already in the store."""
        a, b = self.shard_rows(i)
        return self._sources[a:b]

    @cached_property
    def _layout_by_path(self) -> dict[str, str]:
        table = self.manifest.table
        if "pixel_layout" not in table.columns:
            return {}
        return {p: v for p, v in zip(table["path"], table["pixel_layout"], strict=True) if isinstance(v, str)}

    @cached_property
    def _layouts(self) -> list[str]:
        by_path = self._layout_by_path
        return [by_path.get(path, "") for path in self.rows["path"]]

    def shard_layouts(self, i: int) -> list[str]:
        """For each row of shard `i`.

        The scan's pixel layout of its file (`ichdata.dicom.read_header_layout`), "" where the manifest has
        none (the shard task then parses the header itself).
        """
        a, b = self.shard_rows(i)
        return self._layouts[a:b]

    @cached_property
    def _identities(self) -> np.ndarray:
        """(n_slices, 3) int64: each row's size, modification time and header CRC-32; `_UNKNOWN` where unknown.

        Arrays, sliced per shard: the driver submits thousands of shards, and a tuple per row of a
        752k-row plan would hold a hundred MB.
        """
        out = np.full((len(self.rows), 3), _UNKNOWN, dtype=np.int64)
        for k, col in enumerate(("size", "mtime_ns")):
            out[:, k] = self.rows[col].fillna(_UNKNOWN).to_numpy(dtype=np.int64)
        table = self.manifest.table
        if "header_crc32" in table.columns and len(self.rows):
            found, at = index_in(self.rows["path"], table["path"])
            crc = table["header_crc32"]
            known = found & ~crc.isna().to_numpy()[at]
            out[known, 2] = crc.fillna(_UNKNOWN).to_numpy(dtype=np.int64)[at[known]]
        return out

    def shard_identities(self, i: int) -> list[tuple[int | None, int | None, int | None]]:
        """For each row of shard `i`: what the scan saw of its file (`ichdata.dicom.FileIdentity`).

        Size, modification time and the CRC-32 of the header bytes; None where unknown (the header's
        CRC in a manifest of an earlier release). The shard task refuses a file that differs.
        """
        a, b = self.shard_rows(i)
        return [
            (
                None if size == _UNKNOWN else size,
                None if mtime == _UNKNOWN else mtime,
                None if crc == _UNKNOWN else crc,
            )
            for size, mtime, crc in self._identities[a:b].tolist()
        ]

    @property
    def n_set_aside(self) -> int:
        """Files in the quarantine that are not rows of `images` (the rest are reports: `KEPT_REASONS`)."""
        return int((~self.quarantine["reason"].isin(KEPT_REASONS)).sum())

    def new_quarantine(self) -> pd.DataFrame:
        """Files set aside by this run (not those an earlier run reported)."""
        return self.quarantine.loc[self.quarantine["new"]].reset_index(drop=True)

    def quarantined_by_reason(self, *, new_only: bool = False) -> dict[str, int]:
        """Quarantined files per reason, sorted by reason (this run's only when `new_only`)."""
        q = self.new_quarantine() if new_only else self.quarantine
        return {str(k): int(v) for k, v in q["reason"].value_counts().sort_index().items()}

    def without(self, failures: pd.DataFrame) -> Plan:
        """This plan with the rows of `failures` moved to the quarantine.

        `failures` (path, reason, detail) are files that failed at pixel time: later rows move up, so
        shards from the first affected one change keys.
        """
        if not len(failures):
            return self
        drop = set(failures["path"])
        keep = ~self.rows["path"].isin(drop).to_numpy()
        if np.any(self.rows["existing"].to_numpy() & ~keep):
            raise ValueError("a row already committed in the store cannot be dropped from the plan")
        dropped = self.rows.loc[~keep]
        per_series = np.repeat(np.arange(len(self.series)), self.series["n_slices"].to_numpy())
        counts = np.bincount(per_series[keep], minlength=len(self.series))
        series = self.series.assign(n_slices=counts.astype(np.int64))
        series = series.loc[series["n_slices"] > 0].reset_index(drop=True)
        info = dropped.set_index("path")[["size", "mtime_ns"]]
        f = failures.drop_duplicates("path").set_index("path")
        added = pd.DataFrame(
            {
                "path": list(f.index),
                "reason": f["reason"].to_numpy(),
                "detail": f["detail"].to_numpy(),
                "size": info.reindex(f.index)["size"].to_numpy(),
                "mtime_ns": info.reindex(f.index)["mtime_ns"].to_numpy(),
                "new": True,
            }
        )
        rows = self.rows.loc[keep].reset_index(drop=True)
        # Reports on stored files: none for a dropped file, and the same-position ones found again.
        q = self.quarantine
        q = q.loc[
            ~(
                q["reason"].isin(KEPT_REASONS)
                & (q["path"].isin(drop) | (q["reason"] == Reason.DUPLICATE_POSITION))
            )
        ]
        flags = duplicate_positions(rows, series)
        parts = [q, added, *([pd.DataFrame(flags, columns=_QUARANTINE)] if flags else [])]
        quarantine = _sorted_quarantine(pd.concat(parts, ignore_index=True))
        return replace(
            self,
            rows=rows,
            series=series,
            labels=self.labels[keep],
            quarantine=quarantine,
            _keys={},
        )

    def manifest_table(self) -> pd.DataFrame:
        """The manifest as `finalize` writes it.

        Every input file once, with its store `row` (-1 when set aside), its final reason and detail, its
        labels (one uint8 column per class) and patient key.
        """
        t = self.manifest.table.drop(columns=["patient_id"], errors="ignore")
        t = t.drop_duplicates("path", keep="last").reset_index(drop=True)
        where = pd.Index(t["path"])
        pos = where.get_indexer(self.rows["path"])
        if (pos < 0).any():
            raise ValueError("a planned row is missing from the manifest")
        row = np.full(len(t), -1, dtype=np.int64)
        row[pos] = np.arange(self.n_slices, dtype=np.int64)
        labels = np.full((len(t), len(CLASSES)), UNLABELLED, dtype=np.uint8)
        labels[pos] = self.labels
        series_of_row = np.repeat(np.arange(len(self.series)), self.series["n_slices"].to_numpy())
        pkey = t["patient_key"].to_numpy(dtype=object).copy()
        pkey[pos] = self.series["patient_key"].to_numpy(dtype=object)[series_of_row]
        reason = t["reason"].to_numpy(dtype=object).copy()
        detail = t["detail"].to_numpy(dtype=object).copy()
        reason[pos] = detail[pos] = ""  # a stored file's reason is a report of this run's, if any
        qpos = where.get_indexer(self.quarantine["path"])
        ok = qpos >= 0
        reason[qpos[ok]] = self.quarantine["reason"].to_numpy(dtype=object)[ok]
        detail[qpos[ok]] = self.quarantine["detail"].to_numpy(dtype=object)[ok]
        t = t.assign(row=row, patient_key=pkey, reason=reason, detail=detail)
        t = t.assign(**{c: labels[:, j] for j, c in enumerate(CLASSES)})
        return t.sort_values("path", kind="stable").reset_index(drop=True)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _sorted_quarantine(q: pd.DataFrame) -> pd.DataFrame:
    return q.sort_values("path", kind="stable").reset_index(drop=True)


def patient_key(patient_id: str | None, salt: bytes) -> str:
    """(0010,0020) Patient ID → the key stored: RSNA's `ID_…` ids as is, anything else salted-hashed."""
    pid = "" if patient_id is None else str(patient_id)
    if _RSNA_PATIENT.match(pid):
        return pid
    return "P" + hashlib.blake2b(pid.encode(), key=salt, digest_size=8).hexdigest()


def load_labels(labels: str | os.PathLike[str] | pd.DataFrame | None) -> pd.DataFrame | None:
    """The label table (`ichdata.labels.read_labels`) from a CSV path, or as given."""
    if labels is None or isinstance(labels, pd.DataFrame):
        return labels
    from ichdata.labels import read_labels

    p = Path(labels)
    if not p.is_file():
        raise UserError(f"--labels {p}: no such file; expected an RSNA label CSV (ID,Label)")
    return read_labels(p)


def plan(
    manifest: Manifest,
    store: str | os.PathLike[str],
    labels: str | os.PathLike[str] | pd.DataFrame | None = None,
    shard_size: int | None = None,
    overwrite: bool = False,
    image_size: int = IMAGE_SIZE,
) -> Plan:
    """Plan the conversion of `manifest` into `store` (see the module docstring).

    Reads, never writes, the store (only `STORE.salt` is created when missing).
    """
    store = Path(store)
    label_table = load_labels(labels)
    shard_size = resolve_shard_size(store, shard_size, overwrite)
    config = plan_config(manifest.source, shard_size, image_size)
    # The scan's own read of the previous manifest, when it was of this store's manifest; handed over
    # once (not kept by the plan's manifest, which lives through the conversion).
    known, manifest.previous = manifest.previous, None
    attrs, prev = previous_run(store, config, overwrite, known=known)
    scanned = manifest.table
    manifest, in_store, old_q, fresh = _carry_over(manifest, prev)
    n_existing = len(in_store)
    if n_existing and not np.array_equal(in_store["row"].to_numpy(dtype=np.int64), np.arange(n_existing)):
        raise UserError(
            f"{manifest_path(store)}: store rows are not 0..{n_existing - 1}; the manifest is damaged"
        )
    salt = load_salt(
        store,
        must_exist=n_existing > 0
        and any(not _RSNA_PATIENT.match(str(k)) for k in in_store["patient_key"].unique()),
    )
    q_rows, cand = header_and_pixel_failures(fresh, (attrs or {}).get("pixel_failures", []))
    detail, reason = duplicates(cand, in_store, str(manifest.source))
    q_rows += set_aside(cand, detail, reason)
    cand = cand.loc[detail.isna().to_numpy()]
    detail = late_slices(cand, in_store)
    q_rows += set_aside(cand, detail, pd.Series(Reason.SERIES_IN_STORE, index=cand.index))
    cand = cand.loc[detail.isna().to_numpy()]
    rows, series = _store_order(in_store, cand, salt)
    q_rows += changed_since_conversion(in_store, scanned) + duplicate_positions(rows, series)
    frames = [old_q.assign(new=False)[_QUARANTINE]] if len(old_q) else []
    if q_rows:
        frames.append(pd.DataFrame(q_rows, columns=_QUARANTINE))
    quarantine = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_QUARANTINE)
    quarantine["new"] = quarantine["new"].astype(bool)
    return Plan(
        store=store,
        source=Path(manifest.source),
        shard_size=shard_size,
        image_size=image_size,
        config=config,
        rows=rows,
        series=series,
        labels=_labels(rows, in_store, label_table),
        quarantine=_sorted_quarantine(quarantine),
        n_existing=n_existing,
        manifest=manifest,
        labels_source=None if labels is None or isinstance(labels, pd.DataFrame) else str(labels),
        overwrite=overwrite,
        store_config=stored_config(config, salt),
    )


def _carry_over(
    manifest: Manifest, prev: Manifest | None
) -> tuple[Manifest, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split the scan against the previous manifest.

    (the manifest with the previous rows carried over, the rows already in the store in row order, the files
    set aside before and unchanged or gone since, the files to plan now).
    """
    scanned = manifest.table
    prev_t = prev.table if prev is not None else None
    if prev_t is None or not len(prev_t):
        return manifest, scanned.iloc[:0].assign(row=pd.Series(dtype=np.int64)), scanned.iloc[:0], scanned
    # Files already in the store keep their previous row; everything else takes this scan's row.
    in_store = prev_t.loc[prev_t["row"] >= 0].sort_values("row")
    prev_q = prev_t.loc[prev_t["row"] < 0]
    # A file set aside because it changed while it was converted is planned again from this scan.
    prev_q_unchanged = prev_q.loc[prev_q["reason"] != Reason.CHANGED_DURING_CONVERSION].merge(
        scanned[["path", "size", "mtime_ns"]], on=["path", "size", "mtime_ns"]
    )
    prev_q_gone = prev_q.loc[~is_in(prev_q["path"], scanned["path"])]
    old_q = pd.concat([prev_q_unchanged, prev_q_gone], ignore_index=True)
    known = pd.concat([in_store["path"], old_q["path"]], ignore_index=True)
    fresh = scanned.loc[~is_in(scanned["path"], known)]
    carried = pd.concat([t for t in (in_store, old_q) if len(t)] or [in_store], ignore_index=True).drop(
        columns=["patient_id"], errors="ignore"
    )
    merged = Manifest(manifest.source, pd.concat([carried, fresh], ignore_index=True).sort_values("path"))
    return merged, in_store, old_q, fresh


def _store_order(
    in_store: pd.DataFrame, cand: pd.DataFrame, salt: bytes
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plan's rows and series.

    The existing rows, then new series by (study, series) UID, each in slice order.
    """
    parts = [in_store]
    series_rows = _stored_series(in_store)
    if len(cand):
        ordered = cand.iloc[_slice_order(cand)]
        parts.append(ordered)
        g = ordered.groupby(["study_uid", "series_uid"], sort=True)
        firsts = g.first()  # first non-null value per column: the series' patient id
        for (study_uid, series_uid), n, pid, pkey in zip(
            firsts.index,
            g.size().to_numpy(),
            firsts["patient_id"] if "patient_id" in firsts else [None] * len(firsts),
            firsts["patient_key"],
            strict=True,
        ):
            ident = pid if isinstance(pid, str) else (pkey if isinstance(pkey, str) else None)
            series_rows.append(
                {
                    "study_uid": study_uid,
                    "series_uid": series_uid,
                    "patient_key": patient_key(ident, salt),
                    "n_slices": int(n),
                }
            )
    cols = ["path", "size", "mtime_ns", "image_id", "slice_position"]
    rows = pd.concat([p[cols] for p in parts], ignore_index=True) if parts else pd.DataFrame(columns=cols)
    rows["existing"] = np.arange(len(rows)) < len(in_store)
    for c in ("size", "mtime_ns"):  # one dtype whatever the rows came from: the shard keys print them
        rows[c] = pd.array(rows[c], dtype="Int64")
    series = pd.DataFrame(series_rows, columns=["study_uid", "series_uid", "patient_key", "n_slices"])
    series["n_slices"] = series["n_slices"].astype(np.int64)
    return rows, series


def _stored_series(in_store: pd.DataFrame) -> list[dict[str, Any]]:
    """The series of the rows already in the store, in store order.

    A series is a run of rows with one (study, series) UID; each takes its first row's patient key.
    """
    n_existing = len(in_store)
    if not n_existing:
        return []
    study, suid = in_store["study_uid"].to_numpy(), in_store["series_uid"].to_numpy()
    run_start = np.flatnonzero(np.r_[True, (suid[1:] != suid[:-1]) | (study[1:] != study[:-1])])
    n_slices = np.diff(np.r_[run_start, n_existing])
    pkey = in_store["patient_key"].to_numpy()[run_start]
    return [
        {"study_uid": st, "series_uid": se, "patient_key": pk, "n_slices": int(n)}
        for st, se, pk, n in zip(study[run_start], suid[run_start], pkey, n_slices, strict=True)
    ]


def _slice_order(cand: pd.DataFrame) -> np.ndarray:
    """The order of the new slices.

    By series, then the keys of `ichdata.order.slice_order` (position along the normal, InstanceNumber with
    missing last, image id), sorted for all series at once (a loop over tens of thousands of series costs
    minutes of pandas overhead).
    """
    series_code = cand.groupby(["study_uid", "series_uid"], sort=True).ngroup().to_numpy()
    inst = cand["instance_number"]
    return np.lexsort(
        (
            pd.factorize(cand["image_id"], sort=True)[0],
            inst.fillna(0).to_numpy(dtype=np.int64),
            inst.isna().to_numpy(),
            cand["slice_position"].to_numpy(dtype=np.float64),
            series_code,
        )
    )


def _labels(rows: pd.DataFrame, in_store: pd.DataFrame, label_table: pd.DataFrame | None) -> np.ndarray:
    """(N, 6) uint8: the CSV's labels where it has the image, else what the store had, else 255."""
    n_existing = len(in_store)
    lab = np.full((len(rows), len(CLASSES)), UNLABELLED, dtype=np.uint8)
    if n_existing:
        lab[:n_existing] = in_store[list(CLASSES)].to_numpy(dtype=np.uint8)
    if label_table is not None and len(rows):
        found = label_table.reindex(rows["image_id"].to_numpy())
        has = found.notna().all(axis=1).to_numpy()
        lab[has] = found.loc[has, list(CLASSES)].to_numpy(dtype=np.uint8) if has.any() else lab[has]
    return lab


__all__ = ["Plan", "load_labels", "patient_key", "plan"]
