"""A features group: a CNN's per-slice embeddings of a store, one row per store row (`ich features`).

A Zarr v3 group of its own (a path, like a store), so that training never writes into the store and
several feature sets (backbones, folds, TTA) live side by side. Its arrays and attributes are the
README's store section ("The features group"); DESIGN.md "Two-stage training" is the contract: row i
is store row i, and a group made from another store, an older state of this one, or other checkpoints
is refused, never silently used.

This module is the group's format, and imports no torch: creating and growing it, writing one shard
of `features` whole (`ichdata.shardfile`, as the conversion writes `images`) followed by its
done-marker, committing, opening (every shard checked against its recorded CRC-32 when read), checking
it against a store, and `ich verify FEATURES`. Computing the embeddings is `ichmodel.extract`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ichdata.errors import UserError
from ichdata.shardfile import read_shard, shard_checksum, write_images
from ichdata.store import (
    ICH_ATTR,
    array,
    compressors,
    create_shard_done,
    now_utc,
    software_version,
    write_array,
)

if TYPE_CHECKING:
    from zarr import Array, Group

    from ichdata.store import Store

#: Version of the group's layout (the attribute `features_format`, which also marks a features group).
FEATURES_FORMAT = 1
FEATURES_DTYPE = np.dtype(np.float16)
STATES = ("extracting", "complete")
_MARKERS = "extraction/shard_done"
#: Every array of a features group and the groups that hold them (`ichdata.storefiles`' layout).
ARRAYS: tuple[str, ...] = ("features", "checkpoint", "in_sample", "trained_on", _MARKERS)
GROUPS: tuple[str, ...] = ("", "extraction")


# --- the store a features group belongs to -------------------------------------------------------------


def rows_digest(image_ids: Iterable[str]) -> str:
    """A hash of a store's image ids in row order: which rows, in which order, a features group covers."""
    h = hashlib.blake2b(digest_size=16)
    for i in image_ids:
        h.update(str(i).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def store_identity(store: Store, n_rows: int | None = None) -> dict[str, Any]:
    """What a features group records of the store it embeds (its first `n_rows` rows; all by default).

    The row count and a digest of the image ids in order (an append keeps the digest of the first
    rows: a group is then behind, not foreign), the plan's config hash (changes when the store is
    re-converted with other settings), and the plan hash and path for the record.
    """
    n = store.n_slices if n_rows is None else n_rows
    plan = store.attrs.get("plan") or {}
    return {
        "path": str(Path(store.path).absolute()),
        "n_slices": n,
        "rows_digest": rows_digest(store.image_id[:n].tolist()),
        "config_hash": plan.get("config_hash"),
        "plan_hash": plan.get("plan_hash") if n == store.n_slices else None,
    }


def store_relation(recorded: Mapping[str, Any], store: Store) -> str:
    """How the store a group recorded relates to `store`: `same`, `behind` (rows appended since) or `other`."""
    n = int(recorded.get("n_slices", -1))
    if not 0 <= n <= store.n_slices or recorded.get("config_hash") != (store.attrs.get("plan") or {}).get(
        "config_hash"
    ):
        return "other"
    if recorded.get("rows_digest") != rows_digest(store.image_id[:n].tolist()):
        return "other"
    return "same" if n == store.n_slices else "behind"


def check_store(features: Features, store: Store) -> None:
    """Refuse features made from another store, or from an older state of this one, with one line."""
    rec = features.attrs.get("store") or {}
    relation = store_relation(rec, store)
    if relation == "other":
        raise UserError(
            f"features {features.path}: made from another store ({rec.get('path')}, "
            f"{int(rec.get('n_slices', 0)):,} slices), not {store.path}; run `ich features` on this store"
        )
    if relation == "behind":
        raise UserError(
            f"features {features.path}: cover the first {features.n_slices:,} of the {store.n_slices:,} "
            f"slices of {store.path} (rows were appended since); run `ich features` again to add them"
        )


# --- layout and writing --------------------------------------------------------------------------------


def shard_key(config_hash: str, image_ids: Iterable[str]) -> str:
    """The key of a shard's done-marker: the extraction's settings and the image ids of its rows."""
    h = hashlib.blake2b(config_hash.encode(), digest_size=16)
    for i in image_ids:
        h.update(b"\0" + str(i).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@dataclass(frozen=True)
class Marker:
    """A shard's done-marker: how many rows the shard file holds, their key, and their CRC-32."""

    rows: int
    key: str
    checksum: str

    def __str__(self) -> str:
        return f"{self.rows}:{self.key}:{self.checksum}"

    @classmethod
    def parse(cls, text: str) -> Marker | None:
        """The marker written as `text`; None for an empty or foreign one."""
        parts = str(text).split(":")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        return cls(int(parts[0]), parts[1], parts[2])


def is_features_group(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a features group: its `zarr.json`'s `ich` attribute says so.

    `ich` is the attribute namespace only ich writes, as in a store; read as JSON, nothing else opened.
    """
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text(encoding="utf-8"))
        own = meta["attributes"][ICH_ATTR]
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return isinstance(own, dict) and own.get("kind") == "features"


def create_features(path: Path, n_rows: int, dim: int, shard_size: int) -> Group:
    """Create an empty features group at `path` (nothing may be there): `features` and its done-markers."""
    import zarr

    group = zarr.open_group(str(path), mode="w-")
    group.attrs.update(
        {
            ICH_ATTR: {"kind": "features", "format_version": FEATURES_FORMAT},
            "features_format": FEATURES_FORMAT,
            "state": "extracting",
        }
    )
    group.create_array(
        "features",
        shape=(n_rows, dim),
        dtype=FEATURES_DTYPE,
        chunks=(1, dim),
        shards=(shard_size, dim),
        compressors=compressors(),  # zstd, then each row's CRC-32C
        fill_value=0,
        dimension_names=("slice", "feature"),
    )
    _create_markers(group, -(-n_rows // shard_size))
    return group


def _create_markers(group: Group, n_shards: int) -> Array:
    return create_shard_done(group, n_shards, _MARKERS.split("/")[0])


def grow_features(group: Group, n_rows: int) -> None:
    """Size `features` and its markers for `n_rows` rows (an append to the store); committed rows stay."""
    feats = array(group, "features")
    k = int((feats.shards or feats.chunks)[0])
    if feats.shape[0] != n_rows:
        feats.resize((n_rows, feats.shape[1]))
    markers = array(group, _MARKERS)
    if markers.shape[0] != -(-n_rows // k):
        markers.resize((-(-n_rows // k),))
    group.attrs["state"] = "extracting"


def read_markers(group: Group) -> list[Marker | None]:
    """Every shard's done-marker (None where there is none)."""
    arr = array(group, _MARKERS)
    return [Marker.parse(str(v)) for v in np.asarray(arr[...])] if arr.shape[0] else []


def write_shard(group: Group, index: int, block: np.ndarray, key: str) -> Marker:
    """Write shard `index` of `features` whole (`block`: its rows, float16), then its done-marker.

    A shard file is replaced atomically; the marker follows it, so a marked shard is always whole.
    """
    feats = array(group, "features")
    k = int((feats.shards or feats.chunks)[0])
    block = np.ascontiguousarray(block, dtype=FEATURES_DTYPE)
    write_images(feats, index * k, block)
    marker = Marker(len(block), key, shard_checksum(block))
    _mark(group, index, marker)
    return marker


def _mark(group: Group, index: int, marker: Marker) -> None:
    array(group, _MARKERS)[index] = str(marker)


def read_rows(group: Group, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of `features` within one shard, as written (no checksum: the writer's own reads)."""
    return read_shard(array(group, "features"), start, stop)


def commit(
    group: Group,
    *,
    checkpoint: np.ndarray,
    in_sample: np.ndarray,
    trained_on: np.ndarray,
    attrs: Mapping[str, Any],
) -> None:
    """Write the per-row arrays and the attributes, then mark the group `complete`.

    `checkpoint` (N,) int8: which of the attribute `checkpoints` made each row (-1: the mean of all);
    `in_sample` (N,) bool: whether a CNN that made the row trained on its series; `trained_on` (N,)
    bool: whether any of the checkpoints' CNNs did (a model composed of them has seen the row).
    """
    write_array(group, "checkpoint", np.asarray(checkpoint, dtype=np.int8))
    write_array(group, "in_sample", np.asarray(in_sample, dtype=bool))
    write_array(group, "trained_on", np.asarray(trained_on, dtype=bool))
    old = dict(group.attrs)
    group.attrs.put(
        {
            **old,
            **attrs,
            "features_format": FEATURES_FORMAT,
            "software": software_version(),
            "created": old.get("created") or now_utc(),
            "updated": now_utc(),
            "state": "complete",
        }
    )


def remove_features(path: Path) -> None:
    """Delete what ich wrote in the features group at `path` (`ich features --overwrite`).

    Anything else is refused: a folder that is not a features group, or one holding a file ich did
    not write (the message names it), as `--overwrite` treats a store (`ichdata.storefiles`).
    """
    from ichdata.storefiles import refuse_foreign, remove_ich_files

    if not is_features_group(path):
        raise UserError(f"--out {path}: exists and is not a features group; refusing to replace it")
    refuse_foreign(path, what="--out", kind="features group", arrays=ARRAYS, groups=GROUPS)
    remove_ich_files(path, arrays=ARRAYS, groups=GROUPS)


# --- reading -------------------------------------------------------------------------------------------


class _Damaged(ValueError):
    """A shard of `features` that cannot be read or fails its checksum (the message says which)."""


@dataclass
class Features:
    """An opened, complete features group: the per-row arrays in memory, `features` read on demand."""

    path: Path
    array: Array
    attrs: dict[str, Any]
    checkpoint: np.ndarray
    in_sample: np.ndarray
    trained_on: np.ndarray
    markers: list[Marker | None] = field(repr=False, default_factory=list)

    @property
    def n_slices(self) -> int:
        """Rows (store rows) the group covers."""
        return int(self.attrs["n_slices"])

    @property
    def dim(self) -> int:
        """Features per row."""
        return int(self.array.shape[1])

    @property
    def shard_size(self) -> int:
        """Rows per shard file."""
        return int((self.array.shards or self.array.chunks)[0])

    def read_shard(self, i: int) -> np.ndarray:
        """Shard `i`'s rows, float16, checked against the CRC-32 its writer recorded.

        Raises:
            UserError: the shard file is missing, cannot be decoded, or fails its checksum.
        """
        try:
            return self._checked_shard(i)
        except _Damaged as exc:
            raise UserError(
                f"features {self.path}: {exc}; run `ich verify {self.path}`, "
                "or `ich features … --overwrite` to rebuild it"
            ) from None

    def _checked_shard(self, i: int) -> np.ndarray:
        k = self.shard_size
        a, b = i * k, min((i + 1) * k, self.n_slices)
        where = f"shard {i} (rows {a}–{b - 1})"
        try:
            block = read_shard(self.array, a, b)
        except Exception as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise _Damaged(f"{where} cannot be decoded ({first})") from None
        marker = self.markers[i] if i < len(self.markers) else None
        if marker is None or marker.rows != b - a:
            raise _Damaged(f"{where} has no done-marker for its rows")
        got = shard_checksum(block)
        if got != marker.checksum:
            raise _Damaged(f"{where}: checksum {got} differs from the recorded {marker.checksum}")
        return block

    def read_all(self) -> np.ndarray:
        """All rows (N, D) float16, shard by shard, each checked (see `read_shard`)."""
        out = np.empty((self.n_slices, self.dim), dtype=FEATURES_DTYPE)
        k = self.shard_size
        for i in range(-(-self.n_slices // k)):
            out[i * k : min((i + 1) * k, self.n_slices)] = self.read_shard(i)
        return out


def open_features(path: str | os.PathLike[str]) -> Features:
    """Open a complete features group for reading.

    Raises:
        UserError: `path` is not a features group, a newer format, or its `ich features` run has not
            finished.
    """
    import zarr

    p = Path(path)
    if not is_features_group(p):
        raise UserError(f"features {p}: not a features group; expected the --out of `ich features`")
    group = zarr.open_group(str(p), mode="r")
    attrs: dict[str, Any] = json.loads(json.dumps(dict(group.attrs)))
    if int(attrs["features_format"]) > FEATURES_FORMAT:
        raise UserError(
            f"features {p}: format {attrs['features_format']}; this ich reads up to {FEATURES_FORMAT}"
        )
    if attrs.get("state") != "complete":
        raise UserError(
            f"features {p}: the `ich features` run that writes it has not finished; run it again to complete it"
        )
    n = int(attrs["n_slices"])
    return Features(
        path=p,
        array=array(group, "features"),
        attrs=attrs,
        checkpoint=np.asarray(array(group, "checkpoint")[...], dtype=np.int8)[:n],
        in_sample=np.asarray(array(group, "in_sample")[...], dtype=bool)[:n],
        trained_on=np.asarray(array(group, "trained_on")[...], dtype=bool)[:n],
        markers=read_markers(group),
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (what `sha256sum` prints): how features and SRs name a checkpoint."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- ich verify FEATURES -------------------------------------------------------------------------------


@dataclass
class FeaturesReport:
    """What `verify_features` found: `ok` when `problems` is empty; `notes` do not make it fail."""

    path: Path
    n_slices: int = 0
    dim: int = 0
    n_shards: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether verification found no problem."""
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"{self.path}: features of {self.n_slices:,} slices × {self.dim:,}, "
            f"{self.n_shards:,} shards re-read in {self.elapsed_s:.1f} s"
        )
        lines = [f"{head}: OK" if self.ok else f"{head}: {len(self.problems)} problem(s)"]
        lines += [f"  {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_features(path: str | os.PathLike[str]) -> FeaturesReport:
    """Re-read a features group whole: shapes, row count, every shard against its CRC-32, provenance.

    Files inside the group that no array accounts for are problems, as in a store. Provenance: the
    store the group names is opened (when it is there) and must hold the same rows;
    a store that grew since is a note (run `ich features` again), another one a problem; each
    checkpoint it names must still have the recorded sha256 (a missing one is a note).
    """
    from ichdata.store import open_store
    from ichdata.storefiles import stray_files

    t0 = time.perf_counter()
    rep = FeaturesReport(Path(path))
    f = open_features(path)
    rep.n_slices, rep.dim = f.n_slices, f.dim
    problems = rep.problems
    if int(f.array.shape[0]) != f.n_slices:
        problems.append(
            f"features has {int(f.array.shape[0]):,} rows, the attribute n_slices says {f.n_slices:,}"
        )
    if f.attrs.get("dim") != f.dim:
        problems.append(f"the attribute dim is {f.attrs.get('dim')}, features has {f.dim} columns")
    for name, arr in (("checkpoint", f.checkpoint), ("in_sample", f.in_sample), ("trained_on", f.trained_on)):
        if len(arr) != f.n_slices:
            problems.append(f"{name} has {len(arr):,} rows, features {f.n_slices:,}")
    n_ckpt = len(f.attrs.get("checkpoints") or [])
    bad = np.flatnonzero((f.checkpoint < -1) | (f.checkpoint >= n_ckpt))
    if len(bad):
        problems.append(f"checkpoint names no recorded checkpoint in {len(bad):,} rows (e.g. row {bad[0]})")
    rep.n_shards = -(-f.n_slices // f.shard_size)
    for i in range(rep.n_shards):
        try:
            block = f._checked_shard(i)
        except _Damaged as exc:
            problems.append(str(exc))
            continue
        if not np.isfinite(block).all():
            problems.append(f"shard {i}: holds values that are not finite")
    problems.extend(
        f"{Path(path) / s.path}: {s.kind}" for s in stray_files(path, arrays=ARRAYS, groups=GROUPS)
    )
    rec = f.attrs.get("store") or {}
    store_path = Path(str(rec.get("path", "")))
    if not (store_path / "zarr.json").is_file():
        rep.notes.append(
            f"the store it was made from, {store_path}, is not there: its rows were not compared"
        )
    else:
        relation = store_relation(rec, open_store(store_path))
        if relation == "other":
            problems.append(f"{store_path} no longer holds the rows these features were made from")
        elif relation == "behind":
            rep.notes.append(f"{store_path} has rows appended since: run `ich features` again to add them")
    for c in f.attrs.get("checkpoints") or []:
        ckpt = Path(str(c.get("path", "")))
        if not ckpt.is_file():
            rep.notes.append(
                f"checkpoint {ckpt} is not there: the CNN cannot be composed with a sequence model"
            )
        elif file_sha256(ckpt) != c.get("sha256"):
            problems.append(f"checkpoint {ckpt} has changed since the features were made (sha256 differs)")
    rep.elapsed_s = time.perf_counter() - t0
    return rep


__all__ = [
    "ARRAYS",
    "FEATURES_DTYPE",
    "FEATURES_FORMAT",
    "GROUPS",
    "Features",
    "FeaturesReport",
    "Marker",
    "check_store",
    "commit",
    "create_features",
    "file_sha256",
    "grow_features",
    "is_features_group",
    "open_features",
    "read_markers",
    "read_rows",
    "remove_features",
    "rows_digest",
    "shard_key",
    "store_identity",
    "store_relation",
    "verify_features",
    "write_shard",
]
