"""The plan of a conversion: which file goes to which store row and shard, and what is set aside.

`plan(manifest, store, labels=...)` turns a scan into:

- the store order: series one after another, each contiguous and in slice order (DESIGN.md
  "Preprocessing" 4, `ichdata.order.slice_order`); series sorted by (study UID, series UID);
- the shards: rows `[i*K, (i+1)*K)` of `images` form shard `i`; each shard has a *key*, a hash of the
  plan settings and of what the shard holds (for each row: path, size, modification time, image id),
  that the task writing the shard records as its done-marker. A re-run with the same plan skips the
  shards whose marker holds their key; a plan that changes only the tail (an append) redoes only the
  last partial shard and the new ones;
- the set-aside files: header-time reasons from the scan, plus `duplicate` (an image id seen before:
  the first file by path is kept, or the one already in the store; the detail names the kept file) and
  `series_in_store` (a new file of a series the store already holds: series stay contiguous and
  untouched, so it is reported instead of being spliced in; `--overwrite` re-converts everything);
- the labels: (N, 6) uint8 from the label CSV joined by image id, 255 where the CSV has no row; rows
  already in the store keep their labels unless the CSV has them;
- the pseudonymous patient key of each series: an RSNA `ID_…` patient id as is, anything else a salted
  BLAKE2b hash (`P` + 16 hex digits) with the salt kept beside the store (`STORE.salt`).

Incremental: when the store holds a finished conversion of the same source with the same settings, the
plan starts from the manifest kept beside it (`STORE.manifest.parquet`, the commit record that
`finalize` writes before it touches the store's small arrays): the rows already in the store stay
where they are and are never re-read from DICOM, new series are appended, files already set aside keep
their rows in the quarantine and are not reported again (a set-aside file that changed since, e.g. one
caught mid-copy, is examined again).

A store made with different settings (source folder, shard size, image size, format version) is
refused with a `UserError` unless `overwrite`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import secrets
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichdata.errors import UserError
from ichdata.scan import Manifest
from ichdata.store import (
    CLASSES,
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    IMAGE_SIZE,
    QUARANTINE_COLUMNS,
    UNLABELLED,
    manifest_path,
    salt_path,
    store_attrs,
)

DUPLICATE = "duplicate"
SERIES_IN_STORE = "series_in_store"
_RSNA_PATIENT = re.compile(r"^ID_[0-9a-fA-F]+$")
#: Version of the pixel rendering recorded in every shard key: bump it when `read_rendered` changes
#: its output, so that existing stores are refused instead of silently mixing two renderings.
RENDER_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """What a conversion will write; see the module docstring.

    `rows` has one row per store row in store order (columns path, size, mtime_ns, image_id,
    slice_position, existing); `series` one row per series (study_uid, series_uid, patient_key,
    n_slices); `quarantine` every set-aside file (path, reason, detail, size, mtime_ns, new), `new`
    marking those set aside by this run. `n_existing` rows are already committed in the store.
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
    _keys: dict[int, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_slices(self) -> int:
        return len(self.rows)

    @property
    def n_new(self) -> int:
        return len(self.rows) - self.n_existing

    @property
    def n_shards(self) -> int:
        return -(-self.n_slices // self.shard_size)

    @cached_property
    def study_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.series["n_slices"].to_numpy(dtype=np.int64))]).astype(
            np.int64
        )

    @cached_property
    def config_hash(self) -> str:
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
        """The hash of the plan settings and of what shard `i` holds (its done-marker): for each row,
        path, size, modification time and image id."""
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
        # One pass over the rows, not a pandas slice per shard: the driver submits 11,763 shards for RSNA.
        root = str(self.source)
        r = self.rows
        return [None if e else os.path.join(root, p) for p, e in zip(r["path"], r["existing"], strict=True)]

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
        """For each row of shard `i`: the scan's pixel layout of its file (`ichdata.dicom.read_header_layout`),
        "" where the manifest has none (the shard task then parses the header itself)."""
        a, b = self.shard_rows(i)
        return self._layouts[a:b]

    def new_quarantine(self) -> pd.DataFrame:
        """Files set aside by this run (not those an earlier run reported)."""
        return self.quarantine.loc[self.quarantine["new"]].reset_index(drop=True)

    def quarantined_by_reason(self, *, new_only: bool = False) -> dict[str, int]:
        q = self.new_quarantine() if new_only else self.quarantine
        return {str(k): int(v) for k, v in q["reason"].value_counts().sort_index().items()}

    def without(self, failures: pd.DataFrame) -> Plan:
        """This plan with the rows of `failures` (path, reason, detail; files that failed at pixel time)
        moved to the quarantine: later rows move up, so shards from the first affected one change keys."""
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
        quarantine = _sorted_quarantine(pd.concat([self.quarantine, added], ignore_index=True))
        return replace(
            self,
            rows=self.rows.loc[keep].reset_index(drop=True),
            series=series,
            labels=self.labels[keep],
            quarantine=quarantine,
            _keys={},
        )

    def manifest_table(self) -> pd.DataFrame:
        """The manifest as `finalize` writes it: every input file once, with its store `row` (-1 when set
        aside), its final reason and detail, its labels (one uint8 column per class) and patient key."""
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


def _load_salt(store: Path, *, must_exist: bool) -> bytes:
    p = salt_path(store)
    if p.is_file():
        return bytes.fromhex(p.read_text().strip())
    if must_exist:
        raise UserError(
            f"{p}: missing; the store's patient keys were made with it, so new series cannot be keyed "
            "consistently. Put the salt file back beside the store, or pass --overwrite"
        )
    salt = secrets.token_bytes(16)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(salt.hex() + "\n")
    os.chmod(tmp, 0o600)
    with contextlib.suppress(FileExistsError):
        os.link(tmp, p)  # two plans racing on a new store keep the first salt
    tmp.unlink()
    return bytes.fromhex(p.read_text().strip())


def plan_config(source: Path, shard_size: int, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """The settings a store is tied to; a store made with other settings is a different plan."""
    return {
        "format_version": FORMAT_VERSION,
        "render_version": RENDER_VERSION,
        "image_size": image_size,
        "shard_size": shard_size,
        "source": os.path.realpath(source),
    }


def _previous(
    store: Path, config: dict[str, Any], overwrite: bool
) -> tuple[dict[str, Any] | None, Manifest | None]:
    """The store's attributes and previous manifest, after checking that the store has this plan."""
    if overwrite:
        return None, None
    if store.exists() and not (store / "zarr.json").is_file():
        if store.is_dir() and not any(store.iterdir()):
            return None, None
        raise UserError(f"STORE {store}: exists and is not an ich store; choose another path")
    found = store_attrs(store)
    if found is None:
        return None, None
    attrs = dict(found)
    prev_plan = attrs.get("plan") or {}
    prev_config = prev_plan.get("config")
    if prev_config != config:
        was = (
            f"source {prev_config.get('source')}, shard size {prev_config.get('shard_size')}, "
            f"image size {prev_config.get('image_size')}, format {prev_config.get('format_version')}"
            if prev_config
            else "not by `ich convert`"
        )
        now = (
            f"source {config['source']}, shard size {config['shard_size']}, image size {config['image_size']}"
        )
        raise UserError(
            f"STORE {store}: made from a different plan ({was}; this run: {now}); "
            "pass --overwrite to replace it, or choose another STORE"
        )
    mp = manifest_path(store)
    if mp.is_file():
        return attrs, Manifest.read(mp, config["source"])
    if attrs.get("state") == "complete":
        raise UserError(f"{mp}: missing; it records what the store holds, so the store cannot be extended")
    return attrs, None


def check_store(
    store: str | os.PathLike[str],
    source: str | os.PathLike[str],
    shard_size: int | None = None,
    overwrite: bool = False,
) -> None:
    """Raise `UserError` when `store` exists and was made from another plan (or is not a store): what
    `ich convert` checks before it scans, so that a mistake costs a second, not a scan."""
    if not overwrite:
        _previous(Path(store), plan_config(Path(source), resolve_shard_size(store, shard_size)), False)


def resolve_shard_size(store: str | os.PathLike[str], shard_size: int | None, overwrite: bool = False) -> int:
    """The shard size to use: the one asked for, else the existing store's, else `DEFAULT_SHARD_SIZE`."""
    if shard_size is not None:
        if shard_size < 1:
            raise UserError(f"--shard-size {shard_size}: expected a positive number of slices")
        return int(shard_size)
    attrs = None if overwrite else store_attrs(store)
    if attrs and attrs.get("plan") and attrs["plan"].get("config"):
        return int(attrs["plan"]["config"]["shard_size"])
    return DEFAULT_SHARD_SIZE


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
    """Plan the conversion of `manifest` into `store` (see the module docstring). Reads, never writes,
    the store (only `STORE.salt` is created when missing)."""
    store = Path(store)
    label_table = load_labels(labels)
    shard_size = resolve_shard_size(store, shard_size, overwrite)
    config = plan_config(manifest.source, shard_size, image_size)
    attrs, prev = _previous(store, config, overwrite)

    scanned = manifest.table
    prev_t = prev.table if prev is not None else None
    # Files already in the store keep their previous row; everything else takes this scan's row.
    if prev_t is not None and len(prev_t):
        in_store = prev_t.loc[prev_t["row"] >= 0].sort_values("row")
        prev_q = prev_t.loc[prev_t["row"] < 0]
        stored_paths = set(in_store["path"])
        prev_q_unchanged = prev_q.merge(
            scanned[["path", "size", "mtime_ns"]], on=["path", "size", "mtime_ns"]
        )
        prev_q_gone = prev_q.loc[~prev_q["path"].isin(scanned["path"])]
        old_q = pd.concat([prev_q_unchanged, prev_q_gone], ignore_index=True)
        known = stored_paths | set(old_q["path"])
        fresh = scanned.loc[~scanned["path"].isin(known)]
        carried = pd.concat([t for t in (in_store, old_q) if len(t)] or [in_store], ignore_index=True).drop(
            columns=["patient_id"], errors="ignore"
        )
        manifest = Manifest(
            manifest.source, pd.concat([carried, fresh], ignore_index=True).sort_values("path")
        )
    else:
        in_store = scanned.iloc[:0].assign(row=pd.Series(dtype=np.int64))
        old_q = scanned.iloc[:0]
        fresh = scanned
    n_existing = len(in_store)
    if n_existing and not np.array_equal(in_store["row"].to_numpy(dtype=np.int64), np.arange(n_existing)):
        raise UserError(
            f"{manifest_path(store)}: store rows are not 0..{n_existing - 1}; the manifest is damaged"
        )

    salt = _load_salt(
        store,
        must_exist=n_existing > 0 and any(not _RSNA_PATIENT.match(str(k)) for k in in_store["patient_key"]),
    )

    # Header-time set-asides of this scan, and previous pixel-time failures of an unfinished run.
    q_rows: list[dict[str, Any]] = []
    bad = fresh.loc[fresh["reason"] != ""]
    for p, r, d, s, m in zip(
        bad["path"], bad["reason"], bad["detail"], bad["size"], bad["mtime_ns"], strict=True
    ):
        q_rows.append({"path": p, "reason": r, "detail": d, "size": s, "mtime_ns": m, "new": True})
    cand = fresh.loc[fresh["reason"] == ""]
    failed = {f["path"]: f for f in (attrs or {}).get("pixel_failures", [])}
    if failed:
        hit = cand.apply(
            lambda r: (
                r["path"] in failed
                and failed[r["path"]]["size"] == r["size"]
                and failed[r["path"]]["mtime_ns"] == r["mtime_ns"]
            ),
            axis=1,
        ).astype(bool)
        for p, s, m in zip(
            cand.loc[hit, "path"], cand.loc[hit, "size"], cand.loc[hit, "mtime_ns"], strict=True
        ):
            q_rows.append(
                {
                    "path": p,
                    "reason": failed[p]["reason"],
                    "detail": failed[p]["detail"],
                    "size": s,
                    "mtime_ns": m,
                    "new": True,
                }
            )
        cand = cand.loc[~hit]

    # Duplicates: an image id already in the store, or seen earlier (by path) in this scan.
    cand = cand.sort_values("path", kind="stable")
    kept = pd.concat(
        [in_store[["image_id", "path"]], cand[["image_id", "path"]].drop_duplicates("image_id")]
    ).drop_duplicates("image_id")
    kept_path = pd.Series(kept["path"].to_numpy(), index=kept["image_id"].to_numpy())
    is_dup = (
        cand["image_id"].isin(in_store["image_id"]) | cand["image_id"].duplicated(keep="first")
    ).to_numpy()
    dups = cand.loc[is_dup]
    for iid, p, sz, m in zip(dups["image_id"], dups["path"], dups["size"], dups["mtime_ns"], strict=True):
        q_rows.append(
            {
                "path": p,
                "reason": DUPLICATE,
                "detail": f"image id {iid} is already stored from {kept_path[iid]}",
                "size": sz,
                "mtime_ns": m,
                "new": True,
            }
        )
    cand = cand.loc[~is_dup]

    # New slices of a series the store already holds are reported, not spliced in.
    stored_series = set(zip(in_store["study_uid"], in_store["series_uid"], strict=True))
    if stored_series:
        late = np.array(
            [(a, b) in stored_series for a, b in zip(cand["study_uid"], cand["series_uid"], strict=True)],
            dtype=bool,
        )
        for p, suid, s, m in zip(
            cand.loc[late, "path"],
            cand.loc[late, "series_uid"],
            cand.loc[late, "size"],
            cand.loc[late, "mtime_ns"],
            strict=True,
        ):
            q_rows.append(
                {
                    "path": p,
                    "reason": SERIES_IN_STORE,
                    "detail": f"series {suid} is already in the store; pass --overwrite to re-convert it with this slice",
                    "size": s,
                    "mtime_ns": m,
                    "new": True,
                }
            )
        cand = cand.loc[~late]

    # Store order: existing rows, then new series by (study, series) UID, each in slice order.
    parts = [in_store]
    series_rows: list[dict[str, Any]] = []
    if n_existing:
        run_start = np.flatnonzero(
            np.r_[
                True,
                (in_store["series_uid"].to_numpy()[1:] != in_store["series_uid"].to_numpy()[:-1])
                | (in_store["study_uid"].to_numpy()[1:] != in_store["study_uid"].to_numpy()[:-1]),
            ]
        )
        bounds = np.r_[run_start, n_existing]
        for a, b in itertools.pairwise(bounds):
            r0 = in_store.iloc[a]
            series_rows.append(
                {
                    "study_uid": r0["study_uid"],
                    "series_uid": r0["series_uid"],
                    "patient_key": r0["patient_key"],
                    "n_slices": int(b - a),
                }
            )
    if len(cand):
        # Each new series in slice order: position along the normal, ties by InstanceNumber (missing
        # last), then image id: the keys of `ichdata.order.slice_order`, sorted for all series at once
        # (a loop over RSNA's 21,744 series costs a minute of pandas overhead).
        series_code = cand.groupby(["study_uid", "series_uid"], sort=True).ngroup().to_numpy()
        inst = cand["instance_number"]
        order = np.lexsort(
            (
                pd.factorize(cand["image_id"], sort=True)[0],
                inst.fillna(0).to_numpy(dtype=np.int64),
                inst.isna().to_numpy(),
                cand["slice_position"].to_numpy(dtype=np.float64),
                series_code,
            )
        )
        ordered = cand.iloc[order]
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
    rows["existing"] = np.arange(len(rows)) < n_existing
    for c in ("size", "mtime_ns"):  # one dtype whatever the rows came from: the shard keys print them
        rows[c] = pd.array(rows[c], dtype="Int64")
    series = pd.DataFrame(series_rows, columns=["study_uid", "series_uid", "patient_key", "n_slices"])
    series["n_slices"] = series["n_slices"].astype(np.int64)

    # Labels: the CSV where it has the image, else what the store had, else 255.
    lab = np.full((len(rows), len(CLASSES)), UNLABELLED, dtype=np.uint8)
    if n_existing:
        lab[:n_existing] = in_store[list(CLASSES)].to_numpy(dtype=np.uint8)
    if label_table is not None and len(rows):
        found = label_table.reindex(rows["image_id"].to_numpy())
        has = found.notna().all(axis=1).to_numpy()
        lab[has] = found.loc[has, list(CLASSES)].to_numpy(dtype=np.uint8) if has.any() else lab[has]

    qcols = [*QUARANTINE_COLUMNS, "size", "mtime_ns", "new"]
    frames = []
    if len(old_q):
        frames.append(old_q.assign(new=False)[qcols])
    if q_rows:
        frames.append(pd.DataFrame(q_rows, columns=qcols))
    quarantine = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=qcols)
    quarantine["new"] = quarantine["new"].astype(bool)
    return Plan(
        store=store,
        source=Path(manifest.source),
        shard_size=shard_size,
        image_size=image_size,
        config=config,
        rows=rows,
        series=series,
        labels=lab,
        quarantine=_sorted_quarantine(quarantine),
        n_existing=n_existing,
        manifest=manifest,
        labels_source=None if labels is None or isinstance(labels, pd.DataFrame) else str(labels),
        overwrite=overwrite,
    )


__all__ = [
    "DUPLICATE",
    "RENDER_VERSION",
    "SERIES_IN_STORE",
    "Plan",
    "check_store",
    "load_labels",
    "patient_key",
    "plan",
    "plan_config",
]
